"""semfid-maps on tiny local SD1.5, SDXL, SD3.5, Flux and PixArt-Σ pipelines (nothing downloaded)."""

from __future__ import annotations

import pytest
from PIL import Image

from semfid.diffusers.maps_cli import main
from semfid.sefi.tiny import build_tiny_pipeline
from semfid.testing.tiny_dit import build_tiny_dit_pipeline


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sd15", "sdxl", "sd3", "flux", "pixart"])
def test_maps_command_writes_labelled_grids(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build = build_tiny_dit_pipeline if kind in ("sd3", "flux", "pixart") else build_tiny_pipeline
    model = build(kind, tmp_path / "pipe")
    out = tmp_path / "maps"
    argv = ["--model", str(model), "--prompt", "a cat wearing a red hat", "--tokens", "cat,hat",
            "--output", str(out), "--steps", "2", "--step-ranges", "0-1,0-2", "--height", "64", "--width", "64"]
    if kind in ("sd3", "flux", "pixart"):
        argv += ["--max-sequence-length", "32"]
    assert main(argv) == 0
    image = Image.open(out / "image.png")
    for name in ("steps-0-1.png", "steps-0-2.png"):
        grid = Image.open(out / name)  # image + 2 word tiles, 2 columns x 2 rows, label strips
        assert grid.size[0] == 2 * image.size[0] and grid.size[1] > 2 * image.size[1]
    assert main(argv[:4] + ["--tokens", "dog"] + argv[6:]) == 2
    assert "--tokens" in capsys.readouterr().err
