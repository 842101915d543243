"""Vision models of timm and transformers as backbones: `timm:ARCH[@FILE]` and `hf:DIR`.

    load_backbone("timm:vit_small_patch14_dinov2")            # random init, never a download
    load_backbone("timm:vit_base_patch16_224@vit_b16.safetensors")
    load_backbone("hf:checkpoints/dinov2-small")              # config.json + model.safetensors

Layer i is the output of block i before the final norm, prefix tokens (cls, distillation,
registers) dropped: timm through its own `forward_intermediates(norm=False)`, transformers through
`output_hidden_states` (entry i + 1 is block i). Image models read every frame alone; video models
(VideoMAE, V-JEPA 2) read a clip as one sequence of tubelets.
"""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError

from totobench.errors import CheckpointError, ConfigError
from totobench.model.backbone import PAPER_CLIP, Backbone, ModelInputs, num_params
from totobench.model.checkpoint import frozen, read_json, state_sha256
from totobench.registry import did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCH_WEIGHTS = (".pth", ".pt", ".bin")
# what reading a corrupt weights file raises (safetensors, torch's zip and pickle readers)
READ_ERRORS = (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError)


# ---------------------------------------------------------------------- shared
def _pixel_stats(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std as [3, 1, 1] tensors, to normalise frames [..., 3, H, W]."""
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1))


class _FrozenModelBackbone(Backbone):
    """A backbone around one torch module `model` and the mean/std its pixels are normalised with."""

    model: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalise(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [..., 3, H, W] in [0, 1] -> the model's input pixels, same shape."""
        return (frames - self.mean) / self.std


# ---------------------------------------------------------------------- timm
class TimmBackbone(_FrozenModelBackbone):
    """A timm ViT-style model (one token grid and width through all blocks), read per frame."""

    family = "timm"

    def __init__(self, model: torch.nn.Module, name: str, sha256: str, path: Path | None, device: str):
        info = model.feature_info
        cfg = model.pretrained_cfg
        self.model = frozen(model, device)
        self.name, self.sha256, self.path = name, sha256, path
        self.num_layers, self.dim = len(info), info[0]["num_chs"]
        self.num_heads = _num_heads(model)
        self.params = num_params(model)
        self.inputs = ModelInputs(resolution=_timm_resolution(model), patch_size=info[0]["reduction"],
                                  fixed_size=not getattr(model, "dynamic_img_size", False), **PAPER_CLIP)
        self.mean, self.std = _pixel_stats(cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD), device)
        self.notes = ("every frame is read alone as an image (timm forward_intermediates, norm=False); "
                      "cls/register tokens are dropped",
                      "pixels are normalised with the model's pretrained_cfg mean/std")

    def _forward(self, frames: torch.Tensor, layers: list[int], kind: str) -> list[torch.Tensor]:
        """frames [B, T, 3, H, W] -> one [B, T, H/p, W/p, D] tensor per layer (frames read alone)."""
        b, t = frames.shape[:2]
        take = sorted(set(layers))  # forward_intermediates returns blocks in order, each once
        feats = self.model.forward_intermediates(self.normalise(frames.flatten(0, 1)), indices=take, norm=False,
                                                 stop_early=True, output_fmt="NCHW", intermediates_only=True)
        by_layer = dict(zip(take, feats))
        return [by_layer[i].permute(0, 2, 3, 1).unflatten(0, (b, t)) for i in layers]


def load_timm_backbone(rest: str, *, device: str = "cpu", tokenizer=None, random_init: bool = False) -> Backbone:
    """`timm:ARCH` (timm's random init, never a download) or `timm:ARCH@FILE` (weights from a
    local .safetensors, .pth/.pt or .bin state dict, possibly under a "model"/"state_dict" key;
    a classifier head is ignored). random_init: the file is ignored.
    Raises ConfigError for an unknown architecture or one whose blocks change width or grid,
    CheckpointError for a missing or unreadable file or one that does not fit the architecture."""
    import timm

    arch, _, file = rest.partition("@")
    arch = arch.strip()
    if not timm.is_model(arch):
        raise ConfigError(f"timm:{arch}: unknown timm architecture{did_you_mean(arch, timm.list_models(), n=3)}")
    model = _create_timm_model(arch)
    _check_token_model(model, arch)
    path = None if random_init or not file else Path(file).expanduser()
    if path is not None:
        _load_timm_weights(model, _read_state_dict(path), path, arch)
    name = f"timm:{arch}" + (f"@{path.name}" if path is not None else "")
    return TimmBackbone(model, name, state_sha256(model.state_dict()), path, device)


def _create_timm_model(arch: str) -> torch.nn.Module:
    """timm's model `arch` without its classifier, with random weights; with dynamic_img_size
    (frames of any multiple of the patch) when its constructor accepts it."""
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # the constructor has no dynamic_img_size: a fixed position table
        return timm.create_model(arch, pretrained=False, num_classes=0)


def _check_token_model(model: torch.nn.Module, arch: str) -> None:
    """ConfigError unless every block of `model` gives the same token grid and width (a ViT)."""
    info = getattr(model, "feature_info", None) or []
    shapes = sorted({(f["num_chs"], f["reduction"]) for f in info})
    if len(shapes) != 1 or not hasattr(model, "forward_intermediates"):
        stages = ", ".join(f"{c} channels at stride {r}" for c, r in shapes) or "no feature_info"
        raise ConfigError(f"timm:{arch}: its stages change width or grid ({stages}); only ViT-style models "
                          f"whose blocks share one token grid are supported (vit_*, deit_*, eva*, beit*, ...)")


def _timm_resolution(model: torch.nn.Module) -> int:
    """The frame size a timm model was built for: its patch embedding's, else its pretrained_cfg's."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return int(size[-1]) if size else int(model.pretrained_cfg["input_size"][-1])


def _num_heads(model: torch.nn.Module) -> int | None:
    """The attention heads of the first block that has them, None if no module says."""
    for module in model.modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int) and not isinstance(heads, bool):
            return heads
    return None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file or a torch state dict (.pth/.pt/.bin, loaded with
    weights_only=True), unwrapped from a checkpoint's "model" or "state_dict" entry.
    Raises CheckpointError naming the file if it is missing, unreadable or not a state dict."""
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    if path.suffix not in (".safetensors", *TORCH_WEIGHTS):
        raise CheckpointError(f"{path}: expected a .safetensors, .pth, .pt or .bin weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except READ_ERRORS as e:
        raise CheckpointError(f"{path}: not a readable weights file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (tensor names -> tensors)")
    return state


def _load_timm_weights(model: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, arch: str) -> None:
    """Copy `state` into `model`, strictly: every tensor of the model present with its shape, and
    nothing else except classifier head tensors. Raises CheckpointError naming the first key
    that is missing, mis-shaped or unexpected."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointError(f"{path}: tensor {key} is missing (timm {arch} needs it)")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{path}: tensor {key} has shape {list(state[key].shape)}, "
                                  f"timm {arch} expects {list(ref.shape)}")
    heads = model.pretrained_cfg.get("classifier") or "head"
    heads = tuple(f"{h}." for h in ((heads,) if isinstance(heads, str) else heads))
    extra = [k for k in state if k not in expected and not k.startswith(heads)]
    if extra:
        raise CheckpointError(f"{path}: unexpected tensor {extra[0]} (not in timm {arch})")
    model.load_state_dict({k: state[k] for k in expected})


# ---------------------------------------------------------------------- transformers
@dataclass(frozen=True)
class HfLayout:
    """How one transformers model type reads frames."""
    kind: str                                   # "image": one frame; "video": a clip of tubelets
    size_key: str = "image_size"                # config field of the trained frame size
    frames_key: str = ""                        # config field of the clip length (video models)
    fixed_size: bool = False                    # a position table for one frame size only
    fixed_frames: bool = False                  # a position table for one clip length only
    forward_kwargs: dict = field(default_factory=dict)


_INTERPOLATE = {"interpolate_pos_encoding": True}
HF_LAYOUTS = {
    "vit": HfLayout("image", forward_kwargs=_INTERPOLATE),
    "deit": HfLayout("image", forward_kwargs=_INTERPOLATE),
    "ijepa": HfLayout("image", forward_kwargs=_INTERPOLATE),
    "dinov2": HfLayout("image"),
    "dinov2_with_registers": HfLayout("image"),
    "dinov3_vit": HfLayout("image"),
    "clip_vision_model": HfLayout("image", forward_kwargs=_INTERPOLATE),
    "siglip_vision_model": HfLayout("image", forward_kwargs=_INTERPOLATE),
    "videomae": HfLayout("video", frames_key="num_frames", fixed_size=True, fixed_frames=True),
    # V-JEPA 2's 3D RoPE takes its token grid from crop_size: other frame sizes get wrong positions
    "vjepa2": HfLayout("video", size_key="crop_size", frames_key="frames_per_clip", fixed_size=True,
                       forward_kwargs={"skip_predictor": True}),
}
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PREPROCESSOR_CONFIGS = ("preprocessor_config.json", "video_preprocessor_config.json")
# modules the features never pass through: a classification checkpoint need not have them
UNUSED_MODULES = ("pooler.", "predictor.")


class HFVisionBackbone(_FrozenModelBackbone):
    """A transformers vision encoder read through `output_hidden_states`."""

    family = "hf"

    def __init__(self, model: torch.nn.Module, layout: HfLayout, directory: Path, sha256: str,
                 pixels: tuple[tuple, tuple, str], device: str):
        c = model.config
        self.model = frozen(model.float(), device)
        self.layout = layout
        self.name, self.sha256, self.path = f"hf:{directory.name}", sha256, directory
        self.num_layers, self.dim, self.num_heads = c.num_hidden_layers, c.hidden_size, c.num_attention_heads
        self.params = num_params(model)
        size = getattr(c, layout.size_key)
        video = layout.kind == "video"
        self.inputs = ModelInputs(resolution=size if isinstance(size, int) else size[0],
                                  patch_size=c.patch_size if isinstance(c.patch_size, int) else c.patch_size[0],
                                  num_frames=getattr(c, layout.frames_key) if video else PAPER_CLIP["num_frames"],
                                  frame_stride=PAPER_CLIP["frame_stride"],
                                  tubelet=c.tubelet_size if video else 1,
                                  fixed_size=layout.fixed_size, fixed_frames=layout.fixed_frames)
        mean, std, source = pixels
        self.mean, self.std = _pixel_stats(mean, std, device)
        reading = (("a clip is read as one sequence of tubelets of "
                    f"{self.inputs.tubelet} frames",
                    "for kind='image' each frame is read as a static clip (the frame repeated to the "
                    f"model's {self.inputs.num_frames} frames) and its time grid is averaged to one frame")
                   if video else ("every frame is read alone as an image; cls/register tokens are dropped",))
        self.notes = (*reading, f"layer i is hidden_states[i + 1] of {type(model).__name__}", source)

    def _forward(self, frames: torch.Tensor, layers: list[int], kind: str) -> list[torch.Tensor]:
        """frames [B, T, 3, H, W] -> one [B, T', H/p, W/p, D] tensor per layer: T' = T for image
        models and for kind="image", T / tubelet for a video model reading clips."""
        b, t, _, height, width = frames.shape
        h, w = height // self.inputs.patch_size, width // self.inputs.patch_size
        pixels = self.normalise(frames)
        if self.layout.kind == "image":
            feats = self._read(pixels.flatten(0, 1), layers, (1, h, w))
        elif kind == "video":
            feats = self._read(pixels, layers, (t // self.inputs.tubelet, h, w))
        else:
            n = self.inputs.num_frames
            clips = pixels.flatten(0, 1).unsqueeze(1).expand(-1, n, -1, -1, -1)
            feats = [f.mean(1) for f in self._read(clips, layers, (n // self.inputs.tubelet, h, w))]
        return [f.reshape(b, -1, h, w, self.dim) for f in feats]

    def _read(self, pixels: torch.Tensor, layers: list[int], grid: tuple[int, int, int]) -> list[torch.Tensor]:
        """pixels [N, 3, H, W] (image model) or [N, F, 3, H, W] (video model) -> per layer the
        last T'*h*w tokens of hidden_states[i + 1] (the prefix tokens dropped) as [N, T', h, w, D]."""
        inputs = {self.model.main_input_name: pixels, **self.layout.forward_kwargs}
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states
        n = grid[0] * grid[1] * grid[2]
        return [hidden[i + 1][:, -n:].reshape(pixels.shape[0], *grid, self.dim) for i in layers]


def load_hf_backbone(rest: str, *, device: str = "cpu", tokenizer=None, random_init: bool = False) -> Backbone:
    """`hf:DIR`: a transformers vision model folder (config.json + model.safetensors or
    pytorch_model.bin, local only) of a type in HF_LAYOUTS. random_init: the weights are not read.
    Raises CheckpointError for a missing folder, config.json or weights file, or weights that do
    not fit config.json (the first missing or mis-shaped tensor); ConfigError for another type."""
    from transformers import AutoConfig, AutoModel

    directory = Path(rest).expanduser()
    layout = _hf_layout(directory)
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: not a transformers config "
                              f"({str(e).splitlines()[0]})") from None
    config.tie_last_hidden_states = False  # hidden_states[-1] must be the last block's output, not the final norm's
    with _quiet_transformers():
        if random_init:
            model, unused = AutoModel.from_config(config), set()
        else:
            _check_hf_weights(directory)
            try:
                model, info = AutoModel.from_pretrained(directory, config=config, local_files_only=True,
                                                        output_loading_info=True, ignore_mismatched_sizes=True)
            except READ_ERRORS as e:
                raise CheckpointError(f"{directory}: cannot load the weights ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0]})") from None
            unused = _check_loading_info(model, info, directory)
    state = {k: v for k, v in model.state_dict().items() if k not in unused}
    return HFVisionBackbone(model, layout, directory, state_sha256(state), _hf_pixel_stats(directory), device)


def _hf_layout(directory: Path) -> HfLayout:
    """The layout of the model type in DIR/config.json. Raises CheckpointError for a missing
    folder or config.json, ConfigError for a model type this module does not read."""
    from transformers import CONFIG_MAPPING, __version__

    if not directory.is_dir():
        raise CheckpointError(f"{directory}: model folder not found")
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (expected a transformers config.json)")
    config = read_json(path)
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in HF_LAYOUTS:
        raise ConfigError(f"{path}: model_type {model_type!r} is not a supported vision model "
                          f"(supported: {', '.join(HF_LAYOUTS)})")
    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{path}: model_type {model_type!r} needs a newer transformers than {__version__}")
    return HF_LAYOUTS[model_type]


def _check_hf_weights(directory: Path) -> None:
    """CheckpointError naming DIR/model.safetensors unless a weights file (or shard index) is there."""
    if not any((directory / f).is_file() for f in HF_WEIGHTS):
        raise CheckpointError(f"{directory / HF_WEIGHTS[0]}: missing (expected the weights as "
                              f"{' or '.join(HF_WEIGHTS)})")


def _check_loading_info(model: torch.nn.Module, info: dict, directory: Path) -> set[str]:
    """CheckpointError naming the first tensor (in the model's order) that the weights lack or
    give with another shape, pooler/predictor tensors excepted. Tensors of other heads in the file
    (classifier, decoder) are ignored. Returns the missing unused tensors (left at random init)."""
    mismatched = {m[0]: m for m in info["mismatched_keys"]}
    missing = set(info["missing_keys"])
    for key in model.state_dict():
        if key in mismatched:
            _, found, expected = mismatched[key]
            raise CheckpointError(f"{directory}: weight {key} has shape {list(found)}, "
                                  f"config.json implies {list(expected)}")
        if key in missing and not key.startswith(UNUSED_MODULES):
            raise CheckpointError(f"{directory}: weight {key} is missing (config.json implies it)")
    return missing


def _hf_pixel_stats(directory: Path) -> tuple[tuple, tuple, str]:
    """(mean, std, note): image_mean/std of the folder's preprocessor config, else ImageNet's."""
    for name in PREPROCESSOR_CONFIGS:
        path = directory / name
        if path.is_file():
            cfg = read_json(path)
            if "image_mean" in cfg and "image_std" in cfg:
                note = f"pixels are normalised with image_mean/std of {name}"
                return tuple(cfg["image_mean"]), tuple(cfg["image_std"]), note
    return IMAGENET_MEAN, IMAGENET_STD, "pixels are normalised with ImageNet mean/std (no preprocessor config)"


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar: what matters is checked and raised here."""
    from transformers.utils import logging

    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()
