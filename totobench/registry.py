"""One lazy registry for tasks, probes and models: name -> "module:attribute", imported on use.

    TASKS.register("classification", "totobench.tasks.classification:ImageClassification")
    cls = TASKS.get("classification")     # imports the module, checks the class, caches it

Entries are strings, so listing names never imports an entry's module (nor its optional
dependencies: mujoco for the robot task, transformers for HF models). `get` checks what it
imported against the registry's base class (given as "module:attribute", also lazy). An unknown
name is one ConfigError line with the closest names.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Iterable

from totobench.errors import ConfigError


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str:
    """'; did you mean X?' for the closest of `choices` to `name`, else '; known: a, b, c'."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(str(name), choices, n=n) if isinstance(name, str) else []
    if close:
        return f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return f"; known: {', '.join(choices)}" if choices else ""


def import_target(target: str) -> Any:
    """The object a "module:attribute" string names."""
    module, _, attribute = target.partition(":")
    obj = importlib.import_module(module)
    for part in attribute.split(".") if attribute else ():
        obj = getattr(obj, part)
    return obj


class Registry:
    """Named entries of one kind (`what`: "task class", "probe", "model family")."""

    def __init__(self, what: str, base: str | None = None, allow_paths: bool = False):
        self.what, self._base, self._allow_paths = what, base, allow_paths
        self._targets: dict[str, str] = {}
        self._descriptions: dict[str, str] = {}
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, target: str, description: str = "") -> None:
        """Add `name` -> "module:attribute". Registering a name twice with another target raises."""
        if name in self._targets and self._targets[name] != target:
            raise ValueError(f"{self.what} {name!r} is already registered as {self._targets[name]}")
        self._targets[name] = target
        self._descriptions[name] = description

    def names(self) -> list[str]:
        return sorted(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def description(self, name: str) -> str:
        return self._descriptions.get(name, "")

    def check(self, name: str, where: str = "") -> None:
        """Raise ConfigError (prefixed by `where`) when `name` is not registered (nor, where the
        registry allows it, a "module:attribute" path)."""
        if name not in self._targets and not (self._allow_paths and ":" in name):
            prefix = f"{where}: " if where else ""
            raise ConfigError(f"{prefix}unknown {self.what} {name!r}{did_you_mean(name, self._targets)}")

    def get(self, name: str, where: str = "") -> Any:
        """The registered object, imported on first use and checked against the base class."""
        self.check(name, where)
        if name not in self._loaded:
            target = self._targets.get(name, name)
            try:
                obj = import_target(target)
            except (ImportError, AttributeError) as err:
                if name in self._targets:
                    raise  # a registered entry that does not import is a bug, not user input
                prefix = f"{where}: " if where else ""
                raise ConfigError(f"{prefix}{self.what} {name!r} cannot be imported ({err})") from None
            if self._base is not None:
                base = import_target(self._base)
                if not (isinstance(obj, type) and issubclass(obj, base)):
                    raise ConfigError(f"{target} is given as a {self.what} but is not a subclass of "
                                      f"{self._base}")
            self._loaded[name] = obj
        return self._loaded[name]


# A task YAML's `class:` is a name below or, for a task kind outside the package, "module:Class".
TASKS = Registry("task class", base="totobench.tasks.base:Task", allow_paths=True)
TASKS.register("classification", "totobench.tasks.classification:ImageClassification",
               "image classification (ImageNet format), probe on each layer's features")
TASKS.register("video_classification", "totobench.tasks.kinetics:VideoClassification",
               "action recognition (Kinetics-400 format), probe on each layer's clip features")
TASKS.register("label_propagation", "totobench.tasks.davis:DavisLabelPropagation",
               "DAVIS-2017 masks propagated through each layer's patch features")
TASKS.register("ego4d_sta", "totobench.tasks.ego4d_sta:Ego4dSta",
               "Ego4D short-term anticipation, a detection head on each layer's last frame")
TASKS.register("robot_bc", "totobench.tasks.robot:RobotBC",
               "MetaWorld behaviour cloning on each layer's frame features, closed-loop success")

PROBES = Registry("probe", base="totobench.probes.base:Probe", allow_paths=True)
PROBES.register("linear", "totobench.probes.linear:LinearProbe",
                "linear heads for all layers x lrs x wds in one pass; picked on a train hold-out")
PROBES.register("attentive", "totobench.probes.attentive:AttentiveProbe",
                "a learned query attends over one layer's tokens, then a linear classifier")
PROBES.register("knn", "totobench.probes.knn:KnnProbe",
                "cosine kNN (faiss), temperature-weighted votes, all k from one search")
PROBES.register("label_propagation", "totobench.probes.label_propagation:LabelPropagationProbe",
                "first-frame masks carried through a video by feature affinity (DAVIS)")
PROBES.register("sta_head", "totobench.probes.sta_head:StaHeadProbe",
                "next-active-object boxes, noun, verb and time to contact (Ego4D STA)")
PROBES.register("bc_mlp", "totobench.probes.bc_policy:BcMlpProbe",
                "MLP policy by behaviour cloning on frozen frame features (robot)")

# Model families of a `--model SPEC`: "FAMILY:REST" picks a family; a spec without a registered
# prefix is a bundled name or a checkpoint folder (family "checkpoint"). Each target is a loader
# `load(rest: str, *, device, tokenizer, random_init) -> Backbone` (totobench.model.backbone).
MODELS = Registry("model family")
MODELS.register("checkpoint", "totobench.model.tokens:load_checkpoint_backbone",
                "NAME or DIR: a totobench checkpoint folder or a bundled name (toto-tiny)")
MODELS.register("random-init", "totobench.model.tokens:load_random_init_backbone",
                "random-init:SPEC: any spec below with seed-0 random weights (a baseline)")
MODELS.register("preset", "totobench.model.tokens:load_preset_backbone",
                "preset:NAME: the paper's toto-base, toto-large, toto-1b (or toto-tiny), random weights "
                "and a random tokenizer of the preset's vocabulary")
MODELS.register("llama", "totobench.model.llama:load_llama_backbone",
                "llama:DIR with --tokenizer: a transformers Llama (LlamaForCausalLM or LlamaModel) over "
                "visual tokens; layout from DIR/totobench.json")
MODELS.register("timm", "totobench.model.vision:load_timm_backbone",
                "timm:ARCH (random init) or timm:ARCH@FILE (weights from a local .safetensors/.pth/.bin)")
MODELS.register("hf", "totobench.model.vision:load_hf_backbone",
                "hf:DIR: a transformers vision model folder (ViT, DINOv2, VideoMAE, V-JEPA 2, ...)")
MODELS.register("pixels", "totobench.model.pixels:load_pixels_backbone",
                "pixels or pixels:patch=8,resolution=64,frames=8,stride=4: raw patch pixels as "
                "tokens, one layer (the floor of every table)")

# Tokenizers of a `--tokenizer SPEC` ("FAMILY:PATH"): `load(rest: str, *, device) -> tokenizer` with
# encode(frames [N, 3, H, W] in [0, 1]) -> codes [N, H/d, W/d], d = its `downsample` (totobench.model.backbone.load_tokenizer).
TOKENIZERS = Registry("tokenizer family")
TOKENIZERS.register("dvae", "totobench.model.dvae:load_dvae_tokenizer",
                    "dvae:FILE: the DALL-E dVAE encoder (official encoder.pkl, a state dict or safetensors)")
TOKENIZERS.register("vqgan", "totobench.model.vqgan:load_vqgan_tokenizer",
                    "vqgan:PATH: a taming VQGAN (a released folder with checkpoints/last.ckpt + configs/model.yaml, "
                    "a .ckpt or a converted .safetensors)")
TOKENIZERS.register("vqvae", "totobench.model.tokens:load_vqvae_tokenizer",
                    "vqvae:DIR: a totobench VQ-VAE tokenizer folder (config.json + model.safetensors)")
