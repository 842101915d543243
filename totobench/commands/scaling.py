"""`totobench scaling --config FILE [--quick] [--out DIR] [--data SHARDS]`: the muP scaling study
(totobench/pretrain/scaling.py), its table on the console, results.json and scaling.png in --out."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from totobench.io import atomic_write
from totobench.pretrain.scaling import PAPER_FIT, load_scaling_config, run_study


def cli_scaling(args) -> int:
    """Run (or resume) the study of --config into --out (default runs/scaling/<name>[-quick])."""
    cfg = load_scaling_config(args.config, quick=args.quick)
    out = Path(args.out or Path("runs") / "scaling" / (cfg["name"] + ("-quick" if args.quick else "")))
    console = Console(stderr=True)
    results = run_study(cfg, out, console, shards=args.data)
    print(scaling_table(results))
    atomic_write(out / "scaling.png", scaling_png(results))
    print(f"wrote {out / 'results.json'} and {out / 'scaling.png'} ({results['wall_time_s']:.0f} s)")
    return 0


def scaling_table(results: dict) -> str:
    """The family (shape, parameters, MACs per token, final held-out loss), the sweep and the fit."""
    lines = [f"{'model':<6} {'dim':>5} {'layers':>6} {'heads':>5} {'params':>10} {'MACs/token':>11} "
             f"{'steps':>6} {'C (MACs)':>10} {'held-out loss':>13}"]
    for m in results["models"]:
        last = m["curve"][-1] if m["curve"] else {"macs": float("nan"), "heldout_loss": float("nan")}
        lines.append(f"{m['name']:<6} {m['dim']:>5} {m['n_layers']:>6} {m['n_heads']:>5} {m['params']:>10,} "
                     f"{m['macs_per_token']:>11,.0f} {m['steps']:>6} {last['macs']:>10.3g} "
                     f"{last['heldout_loss']:>13.4f}" + ("  (diverged)" if m["diverged"] else ""))
    sweep = ", ".join(f"{r['lr']:g}: {r['heldout_loss']:.4f}" if r["heldout_loss"] is not None else f"{r['lr']:g}: -"
                      for r in results["lr_sweep"])
    fit = results["fit"]
    lines += [f"lr sweep on {results['models'][0]['name']} (held-out loss): {sweep}; transferred lr {results['lr']:g}",
              f"muP: {results['mup_rules']}",
              f"fit L(C) = {fit['a']:.3f} * C^{fit['b']:.4f} on {fit['points']} points ({fit['on']}); "
              f"paper: {PAPER_FIT['a']} * C^{PAPER_FIT['b']}"]
    return "\n".join(lines)


def scaling_png(results: dict) -> bytes:
    """Held-out loss against compute (log-log): one curve per model, the frontier, the fit."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    from totobench.results.plots import figure_png_bytes

    fig = Figure(figsize=(6.4, 4.4), dpi=100, layout="constrained")
    ax = fig.subplots()
    for m in results["models"]:
        if m["curve"]:
            ax.plot([r["macs"] for r in m["curve"]], [r["heldout_loss"] for r in m["curve"]], "o-", ms=3,
                    lw=1.2, label=f"{m['name']} (dim {m['dim']}, {m['n_layers']} layers)")
    front = results["frontier"]
    ax.plot([p["macs"] for p in front], [p["heldout_loss"] for p in front], "k*", ms=8, label="frontier")
    fit = results["fit"]
    c = np.geomspace(min(p["macs"] for p in front), max(p["macs"] for p in front), 50)
    ax.plot(c, fit["a"] * c ** fit["b"], "k--", lw=1.5,
            label=f"fit {fit['a']:.2f} C^{fit['b']:.4f} (paper: C^{PAPER_FIT['b']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))  # losses span less than a decade: label the minor ticks too
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.set_xlabel("training compute C (MACs)")
    ax.set_ylabel("held-out next-token loss (nats)")
    ax.set_title(f"scaling study {results['name']} ({'muP' if results['mup'] else 'SP'}, lr {results['lr']:g})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return figure_png_bytes(fig)
