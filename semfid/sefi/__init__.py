"""SeFi-IDE: one-image subject personalization of a frozen SD1.5 / SDXL pipeline.

A subject (a face, a cat, a chair) becomes a placeholder such as ``<v*>`` represented by S per-stage
token pairs (P^K, P^V): P^K goes through the text encoder to the cross-attention keys, P^V to the values,
and the pair in use follows the diffusion timestep's stage. Training adds the subject-wise attention loss
(each prompt token's map under the placeholder prompt is pulled towards its map under the class-word
prompt), computed by semfid's fused kernels through :mod:`semfid.diffusers`.

```python
from semfid.sefi import train, generate

train("path/to/stable-diffusion-v1-5", ["me.jpg"], "out/me", steps=500)
generate("path/to/stable-diffusion-v1-5", ["out/me"], ["a painting of <v*> in a park"],
         output="me.png", attention_maps="maps/")
```

Command line: ``semfid-train``, ``semfid-generate``, ``semfid-tiny-pipeline`` (see :mod:`semfid.sefi.cli`).

Modules, one concept each:

* :mod:`.config` — ``TrainConfig`` / ``GenerateConfig``: every option, its default and help text,
  read by the API, the docstrings and the CLI (:mod:`.options`, :mod:`.cli`);
* :mod:`.tokens` — the trainable stage token pairs and the stage rule;
* :mod:`.text` — prompt layout and encoding, the K/V text states (``encode_key_value``);
* :mod:`.batches` and :mod:`.train` — training crops / targets and the trainer;
* :mod:`.sample`, :mod:`.heatmaps` and :mod:`.generate` — sampling, heatmap drawing, the entry point;
* :mod:`.learned` and :mod:`.checkpoints` — the file formats (safetensors + JSON, via :mod:`.files`);
* :mod:`.images`, :mod:`.pipeline` — image files, loading a local diffusers folder;
* :mod:`.checks`, :mod:`.schemas` — the validation layer: option values, templates, placeholders,
  output paths, and the schemas of every file read;
* :mod:`.tiny` — tiny random pipelines; :mod:`.errors` — ``SefiInputError``, ``SefiDivergedError``.
"""

from .config import GenerateConfig, TrainConfig
from .errors import SefiDivergedError, SefiInputError
from .generate import generate
from .learned import LearnedSubject, load_learned
from .pipeline import load_components
from .sample import GeneratedImage, SefiSampler
from .text import PromptEncoder, TextStates
from .tiny import build_tiny_pipeline
from .tokens import SefiTokens, stage_of
from .train import SefiTrainer, TrainResult, train

__all__ = [
    "train",
    "generate",
    "TrainConfig",
    "GenerateConfig",
    "TrainResult",
    "SefiTrainer",
    "SefiSampler",
    "GeneratedImage",
    "SefiTokens",
    "stage_of",
    "PromptEncoder",
    "TextStates",
    "LearnedSubject",
    "load_learned",
    "load_components",
    "SefiInputError",
    "SefiDivergedError",
    "build_tiny_pipeline",
]
