"""pytest plugin for both runs: transformers 5.24 asks peft >= 0.22, PyPI has 0.21.2 — lower the
check (same for the stock and the installed run)."""
def pytest_configure(config):
    import transformers.integrations.peft as tp
    tp.MIN_PEFT_VERSION = "0.21.0"
