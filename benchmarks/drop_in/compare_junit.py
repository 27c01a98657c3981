"""Per-test table of two junit runs (stock vs semfid installed everywhere): python compare_junit.py A.xml B.xml."""
import collections
import sys
import xml.etree.ElementTree as ET

def outcomes(path):
    res = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = f'{tc.get("classname")}::{tc.get("name")}'
        kids = {c.tag for c in tc}
        if "failure" in kids or "error" in kids:
            o = "fail"
        elif "skipped" in kids:
            sk = tc.find("skipped")
            o = "xfail" if sk is not None and sk.get("type") == "pytest.xfail" else "skip"
        else:
            o = "pass"
        msg = ""
        for c in tc:
            if c.tag in ("failure", "error"):
                msg = (c.get("message") or "")[:200].replace("\n", " ")
        res[name] = (o, msg)
    return res

a, b = outcomes(sys.argv[1]), outcomes(sys.argv[2])
files = collections.defaultdict(lambda: collections.Counter())
for name in sorted(set(a) | set(b)):
    f = name.split("::")[0].rsplit(".", 1)[0]
    oa, ob = a.get(name, ("missing", ""))[0], b.get(name, ("missing", ""))[0]
    files[f][f"stock_{oa}"] += 1
    files[f][f"inst_{ob}"] += 1
print("| test file (class module) | tests | stock pass/fail/skip | installed pass/fail/skip |")
print("|---|---|---|---|")
for f, c in files.items():
    n = sum(v for k, v in c.items() if k.startswith("stock_"))
    print(f"| {f} | {n} | {c['stock_pass']}/{c['stock_fail']}/{c['stock_skip']+c['stock_xfail']} | "
          f"{c['inst_pass']}/{c['inst_fail']}/{c['inst_skip']+c['inst_xfail']} |")
print("\ndifferences:")
for name in sorted(set(a) | set(b)):
    oa, ob = a.get(name, ("missing", "")), b.get(name, ("missing", ""))
    if oa[0] != ob[0]:
        print(f"- {name}: stock {oa[0]} -> installed {ob[0]}  {ob[1] or oa[1]}")
