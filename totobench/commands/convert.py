"""`totobench convert {dvae,vqgan} FILE [--out OUT]`: a tokenizer file as safetensors, which loads
without pickles."""

from __future__ import annotations

from pathlib import Path

from totobench.errors import ConfigError

KINDS = {"dvae": ("totobench.model.dvae", "convert_dvae", "load_dvae_tokenizer", "DALL-E dVAE encoder"),
         "vqgan": ("totobench.model.vqgan", "convert_vqgan", "load_vqgan_tokenizer", "taming VQGAN encoder")}


def cli_convert(args) -> int:
    """Convert `args.file` (a `args.what` file: "dvae" or "vqgan") to safetensors at `args.out`
    (None: FILE with the suffix .safetensors), then read it back and print one line: the output
    path, the number of codes and the sha256 of the weights (the tokenizer's, which cached
    features are keyed by). Raises ConfigError for another kind, CheckpointError for a file that
    is not what `args.what` says."""
    import importlib
    if args.what not in KINDS:
        raise ConfigError(f"totobench convert: unknown kind {args.what!r}; expected one of {', '.join(KINDS)}")
    module, convert, load, what = KINDS[args.what]
    module = importlib.import_module(module)
    out = Path(args.out) if args.out else Path(args.file).with_suffix(".safetensors")
    converted = getattr(module, load)(str(getattr(module, convert)(args.file, out)))
    print(f"{out}: {what}, {converted.codebook_size} codes, sha256 {converted.sha256}")
    return 0
