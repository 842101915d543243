"""The DALL-E dVAE encoder (Ramesh et al. 2021), the frame tokenizer of the Toto paper.

    tokenizer = load_dvae_tokenizer("encoder.pkl")      # or a state dict, or a .safetensors
    codes = tokenizer.encode(frames)                     # [N, 3, H, W] in [0, 1] -> [N, H/8, W/8]

The network: a 7x7 stem conv, four groups of residual blocks (widths n_hid, 2, 4, 8 x n_hid) with
a 2x2 max-pool after each of the first three, then relu and a 1x1 conv to logits over the
vocabulary; a frame's code at a cell is the argmax of its logits. A block adds
`post_gain * residual(x)` to `shortcut(x)` (a 1x1 conv where the width changes, else x), with
residual = four relu-conv pairs (3x3, 3x3, 3x3, 1x1, width out/4 inside) and post_gain =
1 / (number of blocks)^2. The widths, the blocks per group and the vocabulary are read from the
weights' shapes.

The official weights are OpenAI's encoder.pkl: the whole `dall_e.encoder.Encoder` module pickled
by `torch.save`. It is read here without the `dall_e` package, by an unpickler that accepts only
the classes such a file holds and keeps their saved attributes without running their code.
`totobench convert dvae encoder.pkl` writes the weights as safetensors (our names, fp32), whose
sha256 is the tokenizer's `sha256`.
"""

from __future__ import annotations

import pickle
import re
import sys
import types
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file

from totobench.errors import CheckpointError, DataError
from totobench.io import atomic_write
from totobench.model.checkpoint import sha256_bytes, weights_bytes

GROUPS = 4                  # groups of blocks; a max-pool between consecutive groups
LOGIT_LAPLACE_EPS = 0.1     # the dVAE reads pixels squeezed into [eps, 1 - eps]


class DVAEBlock(nn.Module):
    """shortcut(x) + post_gain * residual(x): [N, n_in, H, W] -> [N, n_out, H, W]."""

    def __init__(self, n_in: int, n_out: int, post_gain: float):
        super().__init__()
        hidden = n_out // 4
        self.post_gain = post_gain
        self.shortcut = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.conv1 = nn.Conv2d(n_in, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv4 = nn.Conv2d(hidden, n_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = self.conv3(F.relu(h))
        h = self.conv4(F.relu(h))
        return self.shortcut(x) + self.post_gain * h


class DVAEEncoder(nn.Module):
    """The dVAE encoder as a frame tokenizer: frames -> one code in [0, vocab_size) per 8x8 pixels.

    `name` is the tokenizer spec and `sha256` identifies the weights (the sha256 of
    `weights_bytes(state_dict())`); `load_dvae_tokenizer` sets both."""

    downsample = 2 ** (GROUPS - 1)

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, name: str = "dvae"):
        super().__init__()
        post_gain = 1 / (GROUPS * n_blk_per_group) ** 2
        widths = [n_hid * 2 ** g for g in range(GROUPS)]
        self.stem = nn.Conv2d(3, n_hid, 7, padding=3)
        self.groups = nn.ModuleList()
        n_in = n_hid
        for width in widths:
            blocks = []
            for _ in range(n_blk_per_group):
                blocks.append(DVAEBlock(n_in, width, post_gain))
                n_in = width
            self.groups.append(nn.Sequential(*blocks))
        self.head = nn.Conv2d(widths[-1], vocab_size, 1)
        self.codebook_size = vocab_size
        self.name = name
        self.sha256 = ""

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mapped pixels [N, 3, H, W] (see `map_pixels`) -> logits [N, vocab_size, H/8, W/8]."""
        x = self.stem(pixels)
        for i, group in enumerate(self.groups):
            x = group(x)
            if i < GROUPS - 1:
                x = F.max_pool2d(x, 2)
        return self.head(F.relu(x))

    @torch.no_grad()
    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """frames FloatTensor [N, 3, H, W] in [0, 1], H and W multiples of 8 -> LongTensor
        [N, H/8, W/8] of codes (argmax of the logits), on the weights' device.

        Runs in fp32 everywhere: the official code runs its convs in fp16 on CUDA, whose rounding
        can flip the argmax of near ties; fp32 gives the same codes on every device.
        Raises DataError for frames of another shape or a non-float dtype."""
        self.check_frames(frames)
        pixels = map_pixels(frames.to(self.head.weight.device, torch.float32))
        return self.logits(pixels).argmax(1)

    def check_frames(self, frames: torch.Tensor) -> None:
        """DataError unless frames are a float [N, 3, H, W] with H, W positive multiples of 8."""
        d = self.downsample
        ok = (frames.is_floating_point() and frames.ndim == 4 and frames.shape[1] == 3
              and frames.shape[2] > 0 and frames.shape[3] > 0 and not frames.shape[2] % d and not frames.shape[3] % d)
        if not ok:
            raise DataError(f"{self.name}: frames must be a float tensor [N, 3, H, W] in [0, 1] with H and W "
                            f"multiples of {d}, got {frames.dtype} {list(frames.shape)}")


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> [eps, 1 - eps], the range the dVAE was trained on (same shape)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


# ---------------------------------------------------------------------- names
def dalle_name(key: str) -> str:
    """Our state-dict key -> the `dall_e` package's (`groups.1.0.conv2.weight` ->
    `blocks.group_2.block_1.res_path.conv_2.w`). A key of neither form comes back unchanged."""
    param = {"weight": "w", "bias": "b"}
    m = re.fullmatch(r"(stem|head)\.(weight|bias)", key)
    if m:
        return f"blocks.{'input' if m[1] == 'stem' else 'output.conv'}.{param[m[2]]}"
    m = re.fullmatch(r"groups\.(\d+)\.(\d+)\.(shortcut|conv(\d))\.(weight|bias)", key)
    if m:
        layer = "id_path" if m[3] == "shortcut" else f"res_path.conv_{m[4]}"
        return f"blocks.group_{int(m[1]) + 1}.block_{int(m[2]) + 1}.{layer}.{param[m[5]]}"
    return key


def architecture(tensors: dict[str, torch.Tensor], path: Path, shown: dict[str, str]) -> dict[str, int]:
    """The DVAEEncoder arguments (n_hid, n_blk_per_group, vocab_size) that weights in dall_e names
    imply. Raises CheckpointError naming `path` when the stem or head weight is absent or has no
    such dimensions (keys named as the file names them: `shown`)."""
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in tensors:
            raise CheckpointError(f"{path}: not a DALL-E dVAE encoder (missing {key})")
    stem, head = tensors["blocks.input.w"].shape, tensors["blocks.output.conv.w"].shape
    if len(stem) != 4 or stem[0] < 4:   # a block is 4 times wider than its residual convs
        raise CheckpointError(f"{path}: {shown.get('blocks.input.w')} has shape {list(stem)}, "
                              f"expected [n_hid, 3, 7, 7] with n_hid >= 4")
    if len(head) != 4 or head[0] < 1:
        raise CheckpointError(f"{path}: {shown.get('blocks.output.conv.w')} has shape {list(head)}, "
                              f"expected [vocab_size, 8 * n_hid, 1, 1]")
    blocks = 0
    while f"blocks.group_1.block_{blocks + 1}.res_path.conv_1.w" in tensors:
        blocks += 1
    return {"n_hid": stem[0], "n_blk_per_group": max(blocks, 1), "vocab_size": head[0]}


def check_weights(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: Path,
                  shown: dict[str, str]) -> None:
    """Weights (dall_e names) against the `expected` shapes (dall_e names), keys named as the file
    names them (`shown`). Raises CheckpointError for the first missing key, then the first
    mismatched shape, then the first unexpected key."""
    for key in expected:
        if key not in tensors:
            raise CheckpointError(f"{path}: not a DALL-E dVAE encoder (missing {shown.get(key, key)})")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise CheckpointError(f"{path}: {shown.get(key, key)} has shape {list(tensors[key].shape)}, "
                                  f"expected {list(shape)}")
    for key in tensors:
        if key not in expected:
            raise CheckpointError(f"{path}: not a DALL-E dVAE encoder (unexpected tensor {shown.get(key, key)})")


# ---------------------------------------------------------------------- reading files
PICKLE_NOTICE = ("totobench: {path} is a pickle: loading it runs code from the file (limited to the "
                 "classes of the dall_e Encoder); `totobench convert dvae {path} --out {out}` writes a "
                 "safetensors copy that loads without pickles")

# module classes of encoder.pkl: read as `PickledModule`s
PICKLED_MODULES = {
    ("dall_e.encoder", "Encoder"), ("dall_e.encoder", "EncoderBlock"), ("dall_e.utils", "Conv2d"),
    ("torch.nn.modules.container", "Sequential"), ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"), ("torch.nn.modules.linear", "Identity"),
}
# plain data and tensor rebuilders: the real objects (torch's weights-only loader allows them too)
PICKLED_DATA = {
    ("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("torch", "device"): torch.device, ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
}


class PickledModule:
    """A module of encoder.pkl as saved: its attributes (`_parameters`, `_modules`, ...), no code."""

    dump_patches = False   # torch.load reads it when a legacy-format file's saved source differs from ours

    def __setstate__(self, state: object) -> None:
        self.state = state if isinstance(state, dict) else {}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a global outside PICKLED_MODULES and PICKLED_DATA."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles encoder.pkl without importing `dall_e`, refusing every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) in PICKLED_MODULES:
            return PickledModule
        if (module, name) in PICKLED_DATA:
            return PICKLED_DATA[module, name]
        raise ForbiddenGlobal(f"{module}.{name}")


RESTRICTED_PICKLE = types.SimpleNamespace(   # the `pickle_module` torch.load reads encoder.pkl with
    __name__="totobench.model.dvae.restricted_pickle", Unpickler=RestrictedUnpickler,
    load=lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load())


def module_parameters(module: PickledModule, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters of an unpickled module tree by dotted name, like `state_dict()`."""
    own, children = module.state.get("_parameters"), module.state.get("_modules")
    params = {f"{prefix}{k}": v for k, v in own.items() if v is not None} if isinstance(own, dict) else {}
    for name, child in children.items() if isinstance(children, dict) else ():
        if isinstance(child, PickledModule):
            params.update(module_parameters(child, f"{prefix}{name}."))
    return params


def read_pickled_module(path: Path) -> object:
    """The object of a torch file that holds code (a pickled module), unpickled by
    RestrictedUnpickler after one notice line on stderr. Raises CheckpointError naming a
    forbidden global, or for a file that does not unpickle."""
    print(PICKLE_NOTICE.format(path=path, out=path.with_suffix(".safetensors")), file=sys.stderr)
    try:
        with warnings.catch_warnings():   # torch warns that our stand-in classes differ from the saved source
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)
    except ForbiddenGlobal as err:
        raise CheckpointError(f"{path}: refusing to unpickle the global {err} (not a class of the DALL-E "
                              f"dVAE encoder)") from None
    except Exception as err:  # a damaged file fails anywhere in pickle or torch
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None


def read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch file: a state dict (read with weights_only=True) or a pickled
    dall_e Encoder (see read_pickled_module). Raises CheckpointError naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:   # it holds globals beyond tensors: a pickled module
        obj = read_pickled_module(path)
    except Exception as err:  # a damaged file fails anywhere in zip, pickle or torch
        raise CheckpointError(f"{path}: not a readable torch file ({first_line(err)})") from None
    if isinstance(obj, PickledModule):
        return module_parameters(obj)
    if isinstance(obj, dict):
        return obj
    raise CheckpointError(f"{path}: not a DALL-E dVAE encoder (the file holds a {type(obj).__name__}, "
                          f"expected the Encoder module or its state dict)")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a dVAE encoder file (.safetensors, else a torch file) by the file's names,
    as fp32. Raises CheckpointError naming the file when it is missing, unreadable or holds
    something other than tensors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (expected the DALL-E dVAE encoder: encoder.pkl, "
                              f"a state dict or a .safetensors)")
    if path.suffix == ".safetensors":
        try:
            tensors = load_safetensors_file(path)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
    else:
        tensors = read_torch_file(path)
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: not a DALL-E dVAE encoder ({key} is a {type(value).__name__}, "
                                  f"not a tensor)")
    return {k: v.detach().float() for k, v in tensors.items()}


def first_line(err: Exception) -> str:
    """The first line of an error's message (its type's name if it has none), for a one-line error."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------- loading and converting
def load_dvae_tokenizer(rest: str, *, device: str = "cpu") -> DVAEEncoder:
    """Tokenizer family "dvae": `rest` is the path (`~` expanded) of the DALL-E dVAE encoder:
    the official encoder.pkl (a pickled `dall_e.encoder.Encoder`; a notice goes to stderr), a
    state dict saved by torch.save (dall_e names), or a .safetensors file (dall_e names or ours).
    Returns the encoder in eval mode without gradients on `device`.
    Raises CheckpointError with one line naming the file: missing or unreadable file, not a dVAE
    encoder, a weight of the wrong shape, a pickle naming a forbidden global."""
    path = Path(rest).expanduser()
    in_file = read_weights(path)
    tensors = {dalle_name(k): v for k, v in in_file.items()}
    shown = {dalle_name(k): k for k in in_file}      # messages name keys as the file does
    with torch.device("meta"):   # no random init: it is slow and would draw from the caller's generator
        model = DVAEEncoder(**architecture(tensors, path, shown), name=f"dvae:{rest}")
    expected = {dalle_name(k): v.shape for k, v in model.state_dict().items()}
    check_weights(tensors, expected, path, shown)
    model.load_state_dict({k: tensors[dalle_name(k)] for k in model.state_dict()}, assign=True)
    model.sha256 = sha256_bytes(weights_bytes(model.state_dict()))
    return model.to(device).eval().requires_grad_(False)


def convert_dvae(src, out) -> Path:
    """Read a dVAE encoder file `src` (any form `load_dvae_tokenizer` reads) and write `out` as
    safetensors (our names, fp32, atomically); the sha256 of `out` is the tokenizer's sha256.
    Returns `out` as a Path. Raises CheckpointError as load_dvae_tokenizer does."""
    model = load_dvae_tokenizer(str(src))
    return atomic_write(Path(out).expanduser(), weights_bytes(model.state_dict()))
