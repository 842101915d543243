"""The `totobench` command.

Every subcommand is declared here with its arguments; its handler lives in `totobench/commands/`
and is imported only when that subcommand runs, so `totobench --help` stays fast.
A handler takes the parsed arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from totobench import __version__
from totobench.errors import TotobenchError
from totobench.host import keep_freed_memory


MODEL_HELP = ("toto-tiny, a checkpoint folder, preset:NAME, llama:DIR, timm:ARCH[@FILE], hf:DIR, pixels, "
              "or random-init:SPEC of any of them (see `totobench ls models`)")
TOKENIZER_HELP = "dvae:FILE (the DALL-E dVAE encoder) or vqvae:DIR, for models over visual tokens"


def _add_run(sub):
    p = sub.add_parser("run", help="evaluate a model on tasks, at every requested layer",
                       description="Evaluate a frozen model on tasks at every requested layer and "
                                   "write one result file per (model, task).")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP + " (default: the model's own)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, or `all`")
    p.add_argument("--layers", default="all", help="`all`, START:STOP:STEP, or a list i,j,-1 "
                   "(layer i = residual stream after block i, 0-based; negatives count from the end)")
    p.add_argument("--out", default="results", help="results folder (default: results/)")
    p.add_argument("--quick", action="store_true", help="a small subset of every split, for smoke tests")
    p.add_argument("--data-root", help="folder holding one dataset root per format "
                   "(imagenet/, kinetics400/, ego4d/, davis/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task setting, e.g. --set imagenet.root=/data/imagenet "
                        "or --set probe.epochs=5 (repeatable)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute results that already exist in --out (default: skip them)")
    p.add_argument("--no-cache", action="store_true",
                   help="do not reuse the feature cache; a cache budget of 0 (probes train streamed)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype of the backbone forward; probes and metrics stay fp32 "
                        "(default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--cache-budget", metavar="SIZE",
                   help="bytes one task may add to the feature cache, e.g. 500G, 1T, 0 (decimal units; "
                        "default: half the free disk under the cache folder); a task whose training "
                        "features exceed it trains its probe streamed")
    p.add_argument("--dry-run", action="store_true",
                   help="print what each task would store and compute (bytes, TFLOPs, cached or streamed) "
                        "and exit; plan paper-sized runs with --set TASK.dataset.size=[TRAIN,VAL]")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image or video (default: skip it and list it in the result)")
    p.set_defaults(handler="totobench.commands.run:cli_run")


def _add_ls(sub):
    p = sub.add_parser("ls", help="list registered tasks, models or probes")
    p.add_argument("what", nargs="?", default="tasks", choices=["tasks", "models", "probes"])
    p.set_defaults(handler="totobench.commands.ls:cli_ls")


def _add_info(sub):
    p = sub.add_parser("info", help="print a model's layers, width, parameters, token grid and tokenizer")
    p.add_argument("checkpoint", metavar="SPEC", help=MODEL_HELP)
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.set_defaults(handler="totobench.commands.info:cli_info")


def _add_convert(sub):
    p = sub.add_parser("convert", help="convert a model file to safetensors (loads later without pickles)")
    p.add_argument("what", choices=["dvae", "vqgan"], help="what the file is: dvae (the DALL-E dVAE encoder.pkl) "
                   "or vqgan (a taming VQGAN folder or .ckpt)")
    p.add_argument("file", help="the file to convert")
    p.add_argument("--out", help="output .safetensors (default: FILE with the suffix .safetensors)")
    p.set_defaults(handler="totobench.commands.convert:cli_convert")


def _add_data(sub):
    p = sub.add_parser("data", help="generate or check datasets")
    dsub = p.add_subparsers(dest="data_command", metavar="{synth,check,robot-demos}")
    dsub.required = True
    s = dsub.add_parser("synth", help="generate the embedded data world in the real dataset formats")
    s.add_argument("--out", required=True, help="folder to write (created)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", default="default", choices=["tiny", "default"])
    s.set_defaults(handler="totobench.commands.data:cli_synth")
    c = dsub.add_parser("check", help="validate a dataset root and summarise it")
    c.add_argument("--format", required=True, choices=["imagenet", "k400", "ego4d-sta", "davis"])
    c.add_argument("root")
    c.set_defaults(handler="totobench.commands.data:cli_check")
    r = dsub.add_parser("robot-demos", help="render MetaWorld expert demonstrations to disk")
    r.add_argument("--out", help="folder to write (default: $TOTOBENCH_HOME/data/robot)")
    r.add_argument("--env", action="append", default=[], help="MetaWorld task, e.g. drawer-open (repeatable)")
    r.add_argument("--demos", type=int, default=25)
    r.add_argument("--resolution", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(handler="totobench.commands.data:cli_robot_demos")


def _add_pretrain(sub):
    p = sub.add_parser("pretrain", help="train the tokenizer and the Toto backbone from scratch")
    p.add_argument("--config", required=True, help="pre-training YAML")
    p.add_argument("--out", help="checkpoint folder (default: from the config)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--device", help="cpu, cuda or cuda:N; under torchrun each rank on cuda:LOCAL_RANK "
                   "(default: the config's device, else cpu)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype of the forward pass (default: the config's train.precision, "
                        "else bf16 on CUDA, fp32 on CPU)")
    p.set_defaults(handler="totobench.commands.pretrain:cli_pretrain")


def _add_scaling(sub):
    p = sub.add_parser("scaling", help="the muP scaling study: a family of Totos to compute budgets, L(C) = a * C^b")
    p.add_argument("--config", required=True, help="scaling YAML (configs/scaling/quick.yaml, paper.yaml)")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick:` section (a smaller study; none: the config as it is)")
    p.add_argument("--out", help="output folder (default: runs/scaling/<name>); re-run it to resume")
    p.add_argument("--data", metavar="SHARDS", help="token shards of `totobench tokenize` (default: the config's "
                   "data.sources, tokenized once into --out)")
    p.set_defaults(handler="totobench.commands.scaling:cli_scaling")


def _add_nll(sub):
    p = sub.add_parser("nll", help="held-out next-token loss of a Toto per frame and token position of a clip")
    p.add_argument("checkpoint", metavar="SPEC", help="toto-tiny, a checkpoint folder or random-init:SPEC")
    p.add_argument("--data", help="a Kinetics-format root (default: the data world's kinetics400/) or a token "
                   "shard folder made by `totobench tokenize`")
    p.add_argument("--split", default="val", help="the Kinetics root's split (default val)")
    p.add_argument("--heldout", type=float, default=0.0, metavar="FRACTION",
                   help="shards: the clips of the files pre-training held out at this data.heldout_fraction "
                        "(default 0: every video in the shards)")
    p.add_argument("--max-clips", type=int, default=None, help="at most this many clips (default: all)")
    p.add_argument("--out", help="folder for nll.csv, nll_positions.csv and nll.png (default: runs/nll/<model>)")
    p.set_defaults(handler="totobench.commands.nll:cli_nll")


def _add_tokenize(sub):
    p = sub.add_parser("tokenize", help="tokenize videos and images into token shards for pre-training",
                       description="Encode every image and video of the sources into token shards "
                                   "(`data.shards` of a pre-training config). Rerun the same command to "
                                   "continue a killed run; under torchrun each rank writes its own shards.")
    p.add_argument("--tokenizer", required=True, help="vqvae:DIR, dvae:FILE or vqgan:PATH")
    p.add_argument("--source", required=True, nargs="+", action="extend", metavar="DIR_OR_LIST",
                   help="a folder searched recursively (e.g. kinetics400/train or imagenet/train) or a text file "
                        "listing one file per line (repeatable)")
    p.add_argument("--out", required=True, help="shard folder (created)")
    p.add_argument("--resolution", type=int, default=128, help="frame size in pixels (default 128)")
    p.add_argument("--frames", type=int, default=16, help="frames of a clip: shorter videos are skipped (default 16)")
    p.add_argument("--stride", type=int, default=4, help="keep every k-th frame of a video (default 4)")
    p.add_argument("--shard-tokens", type=int, default=1 << 26, help="close a shard at this many tokens")
    p.add_argument("--batch", type=int, default=32, help="files per batch: images encoded together, "
                   "progress recorded after each (default 32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(handler="totobench.commands.tokenize:cli_tokenize")


def _add_export(sub):
    p = sub.add_parser("export", help="leaderboard and per-layer tables from result files")
    p.add_argument("results", help="results folder (as written by `run`)")
    p.add_argument("--format", required=True, choices=["md", "csv", "json", "html"])
    p.add_argument("--out", help="output file (default: standard output)")
    p.set_defaults(handler="totobench.commands.export:cli_export")


def _add_compare(sub):
    p = sub.add_parser("compare", help="per-layer curves of several models or runs, by relative depth")
    p.add_argument("results", nargs="+", help="result folders or files")
    p.add_argument("--task", help="only this task")
    p.add_argument("--plot", help="write the layer-sweep plot to this PNG")
    p.add_argument("--against", metavar="PUBLISHED", help="also print each (model, task) beside the same one "
                   "in this results folder: best layers and their difference (e.g. --against results)")
    p.set_defaults(handler="totobench.commands.compare:cli_compare")


def _add_validate(sub):
    p = sub.add_parser("validate", help="check result files against the result schema")
    p.add_argument("files", nargs="+")
    p.set_defaults(handler="totobench.commands.validate:cli_validate")


def _add_davis_eval(sub):
    p = sub.add_parser("davis-eval", help="official DAVIS-2017 semi-supervised J&F of a results folder")
    p.add_argument("--davis-root", required=True)
    p.add_argument("--results", required=True, help="folder with <seq>/<frame>.png indexed masks")
    p.add_argument("--set", dest="split", default="val", help="ImageSets/2017 split (default val)")
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.set_defaults(handler="totobench.commands.metrics:cli_davis_eval")


def _add_sta_eval(sub):
    p = sub.add_parser("sta-eval", help="official Ego4D STA Top-5 mAP of a prediction file")
    p.add_argument("annotations", help="fho_sta_val.json (ground truth)")
    p.add_argument("predictions", help="predictions in the challenge format")
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.set_defaults(handler="totobench.commands.metrics:cli_sta_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="totobench",
        description="Evaluate autoregressive video models layer by layer "
                    "(ImageNet, Kinetics-400, Ego4D STA, DAVIS-2017, robot manipulation).")
    parser.add_argument("--version", action="version", version=f"totobench {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_run, _add_ls, _add_info, _add_convert, _add_data, _add_pretrain, _add_tokenize, _add_export,
                _add_compare, _add_validate, _add_davis_eval, _add_sta_eval,
                _add_scaling, _add_nll):
        add(sub)
    return parser


def _load_handler(path: str):
    module, func = path.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(_load_handler(args.handler)(args) or 0)
    except TotobenchError as err:
        if args.debug:
            raise
        message = " ".join(str(err).splitlines())   # one line, whatever the message holds
        print(f"totobench: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("totobench: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The `totobench` command (console script and `python -m totobench`): large temporary tensors
    reuse freed heap memory (totobench/host.py), then `main`. Kept out of `main`, which tests and
    library users call in their own process: the allocator setting is the command's, not theirs."""
    keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
