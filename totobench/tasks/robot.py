"""Robot manipulation in MetaWorld: behaviour cloning on frozen features, closed-loop success.

Per MetaWorld task: the expert demonstrations (totobench.data.robot, rendered once and cached)
go through the backbone once (through the feature cache; shared out among the ranks under
torchrun); each frame is read as an image and mean-pooled per layer. For each
requested layer, an MLP policy (probes/bc_policy.py) maps [pooled features of the last
`context_frames` frames, proprioception] to the expert's action. The policy then drives the
simulator from seeded initial scenes never seen in the demos; an episode is a success when
`info["success"]` fires within `episode_length` decisions. Metrics per layer: the success rate per
task ("success/<task>") and their mean ("success").

Rollouts of one layer run in lockstep on a pool of environments created once per task (each with
its own renderer) and reused for every layer, so each decision step is one batched backbone call
that stops at that layer. Frame features are computed once and kept in a sliding history. Under
torchrun the rollouts run on rank 0 (the simulator steps are sequential); the other ranks wait.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np
import torch

from totobench.errors import ConfigError
from totobench.features.extract import extract_features, progress_bar
from totobench.tasks.base import LayerRow, RunContext, Task, TaskOutput, register_task

DEFAULTS = {"demos": 25, "rollouts": 5, "episode_length": 40, "action_repeat": 3, "camera": "corner3",
            "context_frames": 3}
MAX_POOL = 10     # simulators (each with a GL context) stepped in lockstep; more seeds take turns


@torch.inference_mode()
def pooled_features(backbone, frames: np.ndarray, layers: list[int], batch_size: int,
                    device: torch.device) -> list[np.ndarray]:
    """uint8 frames [N, R, R, 3] -> per layer float32 [N, D]: each frame read as its own image,
    tokens mean-pooled. One backbone pass per batch for all `layers`."""
    out: list[list[np.ndarray]] = [[] for _ in layers]
    for start in range(0, len(frames), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(frames[start:start + batch_size]))
        x = chunk.to(device).permute(0, 3, 1, 2).float().div_(255.0).unsqueeze(1)   # [B, 1, 3, R, R]
        for i, f in enumerate(backbone.forward_frames(x, layers, kind="image")):
            out[i].append(f[:, 0].mean(dim=1).float().cpu().numpy())
    return [np.concatenate(parts) if parts else np.zeros((0, backbone.dim), np.float32) for parts in out]


class DemoFrames:
    """Extractor items over demonstration frames uint8 [N, R, R, 3]: item i = frame i as a one-frame
    image clip [1, 3, R, R] (so demo features go through the feature cache, and are shared out
    among the ranks under torchrun)."""
    yields_dicts = True

    def __init__(self, frames: np.ndarray):
        self.frames = frames

    def __len__(self):
        return len(self.frames)

    def __getitem__(self, i):
        x = torch.from_numpy(np.ascontiguousarray(self.frames[i])).permute(2, 0, 1).unsqueeze(0)
        return {"frames": x, "label": 0, "index": i, "group": i, "path": None, "skip_reason": None}


def stack_context(features: np.ndarray, lengths: np.ndarray, context: int) -> np.ndarray:
    """Per-step features [sum(lengths), D] of consecutive episodes (episode e has lengths[e]
    steps) -> [sum(lengths), context * D]: features of steps t-context+1 .. t (oldest first),
    the episode's first frame repeated before it starts."""
    rows = []
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for start, n in zip(starts, lengths):
        ep = features[start:start + n]
        idx = np.arange(n)[:, None] + np.arange(-context + 1, 1)[None, :]
        rows.append(ep[np.clip(idx, 0, None)].reshape(n, -1))
    return np.concatenate(rows)


def run_rollouts(envs, seeds: list[int], policy, featurize, context: int, episode_length: int) -> dict:
    """Closed-loop episodes, len(envs) at a time in lockstep (the same env object serves several
    seeds in turn). `featurize(uint8 [B, R, R, 3]) -> float32 [B, D]` is called once per
    decision step for the frames of the still-running episodes; `policy.act([B, context*D + P])`
    gives actions. An episode stops at its first success or after `episode_length` decisions.
    Returns {"success": [bool per seed], "steps": [decisions per seed], "decisions": total}."""
    success = [False] * len(seeds)
    steps = [0] * len(seeds)
    for start in range(0, len(seeds), len(envs)):
        wave = list(range(start, min(start + len(envs), len(seeds))))
        history: dict[int, list[np.ndarray]] = {}
        proprio: dict[int, np.ndarray] = {}
        frames = {}
        for slot, i in enumerate(wave):
            frames[i], proprio[i], _ = envs[slot].reset(seeds[i])
        active = list(wave)
        for _ in range(episode_length):
            if not active:
                break
            feats = featurize(np.stack([frames[i] for i in active]))
            for k, i in enumerate(active):
                # the first frame stands in for the frames before the episode (as in the demos)
                history[i] = history[i][1:] + [feats[k]] if i in history else [feats[k]] * context
            x = np.stack([np.concatenate(history[i] + [proprio[i]]) for i in active])
            actions = policy.act(x)
            still = []
            for k, i in enumerate(active):
                frames[i], proprio[i], _, ok = envs[i - start].step(actions[k])
                steps[i] += 1
                if ok:
                    success[i] = True
                else:
                    still.append(i)
            active = still
    return {"success": success, "steps": steps, "decisions": int(sum(steps))}


@register_task("robot_bc")
class RobotBC(Task):

    def _settings(self, ctx: RunContext) -> dict:
        """The run's settings: YAML values, --quick limits applied; ConfigError naming the key."""
        from totobench.probes.bc_policy import BC_DEFAULTS
        where = self.cfg.get("_path", self.name)
        ds, inp = self.cfg["dataset"], self.cfg.get("input", {})
        envs = ds.get("env") or []
        envs = [envs] if isinstance(envs, str) else list(envs)
        if not envs:
            raise ConfigError(f"{where}: 'dataset.env' must list MetaWorld tasks, e.g. [drawer-open]")
        s = {key: ds.get(key, DEFAULTS[key]) for key in ("demos", "rollouts", "episode_length", "action_repeat", "camera")}
        s["context_frames"] = inp.get("context_frames") or DEFAULTS["context_frames"]
        for key in ("demos", "rollouts", "episode_length", "action_repeat", "context_frames"):
            if not isinstance(s[key], int) or isinstance(s[key], bool) or s[key] < 1:
                section = "input" if key == "context_frames" else "dataset"
                raise ConfigError(f"{where}: '{section}.{key}' must be a positive integer, got {s[key]!r}")
        s["demo_length"] = s["episode_length"]   # demos keep the full length (quick shortens rollouts only)
        for key in ("demos", "rollouts", "episode_length"):
            limit = self.quick_limit(key, ctx.quick)
            if limit is not None:
                s[key] = min(s[key], int(limit))
        r = ctx.backbone.config.resolution
        if inp.get("resolution") not in (None, r):
            raise ConfigError(f"{where}: 'input.resolution' must be null or the model's resolution {r}, "
                              f"got {inp['resolution']}")
        if inp.get("kind", "image") != "image":
            raise ConfigError(f"{where}: 'input.kind' must be image for robot_bc "
                              f"(each frame is encoded once and its features reused)")
        probe = {k: v for k, v in self.cfg.get("probe", {}).items() if k != "name"}
        unknown = sorted(set(probe) - set(BC_DEFAULTS))
        if unknown:
            raise ConfigError(f"{where}: unknown key 'probe.{unknown[0]}' (expected: name, {', '.join(BC_DEFAULTS)})")
        probe = {**BC_DEFAULTS, **probe}
        epochs = self.quick_limit("epochs", ctx.quick)
        if epochs is not None:
            probe["epochs"] = min(int(probe["epochs"]), int(epochs))
        probe["hidden"] = tuple(int(h) for h in probe["hidden"])
        return {"envs": envs, "resolution": r, "probe": probe, **s}

    def run(self, ctx: RunContext) -> TaskOutput:
        with single_thread():
            return self._run(ctx)

    def _run(self, ctx: RunContext) -> TaskOutput:
        from totobench.data.robot import (RobotEnv, demos_fingerprint, load_or_record_demos,
                                          metaworld_name, rollout_seed, short_name)
        from totobench.probes.bc_policy import train_bc_policy
        s = self._settings(ctx)
        envs = [short_name(metaworld_name(e)) for e in s["envs"]]
        timing = {"demos": 0.0, "demo_features": 0.0, "train": 0.0, "env_setup": 0.0, "rollout": 0.0}
        rollout_cpu = 0.0
        cpu0 = time.process_time()
        decisions = 0
        per_env: dict[str, dict] = {}
        rates: dict[int, dict[str, float]] = {layer: {} for layer in ctx.layers}
        all_demos = {}
        seeds = [rollout_seed(ctx.seed, j) for j in range(s["rollouts"])]
        context = s["context_frames"]

        with progress_bar(ctx.console) as progress:
            for name in envs:
                t0 = time.perf_counter()
                job = progress.add_task(f"{name} demos", total=s["demos"], rate="")
                demos, path = load_or_record_demos(
                    ctx.data_root, name, s["demos"], s["resolution"], ctx.seed, s["demo_length"],
                    s["action_repeat"], s["camera"], on_episode=lambda: progress.update(job, advance=1))
                progress.update(job, completed=s["demos"])
                all_demos[name] = demos
                t1 = time.perf_counter()
                lengths = demos["length"]
                valid = np.concatenate([demos["frames"][e, :n] for e, n in enumerate(lengths)])
                cached = extract_features(
                    ctx.backbone, DemoFrames(valid), ctx.layers, kind="image", pooling="mean", cache=ctx.cache,
                    key_parts={"transform": f"robot-demo-frames-{s['resolution']}", "task": name,
                               "dataset": demos_fingerprint({name: demos})},
                    batch_size=ctx.batch_size, device=ctx.device, console=None, desc=f"{name} demo features")
                feats = [np.asarray(cached.feats[layer], dtype=np.float32) for layer in ctx.layers]
                t2 = time.perf_counter()
                actions = np.concatenate([demos["actions"][e, :n] for e, n in enumerate(lengths)])
                proprio = np.concatenate([demos["proprio"][e, :n] for e, n in enumerate(lengths)])
                pool = [RobotEnv(name, s["resolution"], s["camera"], s["action_repeat"])
                        for _ in range(min(len(seeds), MAX_POOL))]
                t3 = time.perf_counter()
                timing["demos"] += t1 - t0
                timing["demo_features"] += t2 - t1
                timing["env_setup"] += t3 - t2
                per_env[name] = {"demos_file": str(path), "num_demos": int(len(lengths)),
                                 "demo_steps": int(lengths.sum()), "rollout_seeds": seeds, "layers": {}}
                job = progress.add_task(f"{name} rollouts", total=len(ctx.layers) * len(seeds), rate="")
                try:
                    for li, layer in enumerate(ctx.layers):
                        t0 = time.perf_counter()
                        x = np.concatenate([stack_context(feats[li], lengths, context), proprio], axis=1)
                        policy, fit = train_bc_policy(x, actions, seed=ctx.seed, **s["probe"])
                        t1, c1 = time.perf_counter(), time.process_time()

                        def featurize(frames, layer=layer):
                            return pooled_features(ctx.backbone, frames, [layer], ctx.batch_size, ctx.device)[0]

                        res = run_rollouts(pool, seeds, policy, featurize, context, s["episode_length"])
                        t2, c2 = time.perf_counter(), time.process_time()
                        timing["train"] += t1 - t0
                        timing["rollout"] += t2 - t1
                        rollout_cpu += c2 - c1
                        decisions += res["decisions"]
                        rate = float(np.mean(res["success"]))
                        rates[layer][name] = rate
                        per_env[name]["layers"][str(layer)] = {
                            "success": rate, "successes": res["success"], "steps": res["steps"],
                            "train_mse": fit["train_mse"], "train_steps": fit["steps"]}
                        progress.update(job, advance=len(seeds),
                                        rate=f"{1e3 * (t2 - t1) / max(res['decisions'], 1):.0f} ms/step")
                finally:
                    for env in pool:
                        env.close()

        rows = []
        for layer in ctx.layers:
            metrics = {"success": float(np.mean([rates[layer][n] for n in envs]))}
            metrics.update({f"success/{n}": rates[layer][n] for n in envs})
            rows.append(LayerRow(layer=layer, metrics=metrics))
        timing["rollout_step"] = timing["rollout"] / max(decisions, 1)
        timing["rollout_step_cpu"] = rollout_cpu / max(decisions, 1)
        timing["cpu"] = time.process_time() - cpu0
        settings = {**s["probe"], "hidden": list(s["probe"]["hidden"])}
        protocol = {"probe": "bc_mlp", "grid": {k: [v] for k, v in settings.items()}, "settings": settings,
                    "envs": envs, "demos_per_env": s["demos"], "rollouts_per_env": s["rollouts"],
                    "episode_length": s["episode_length"], "action_repeat": s["action_repeat"],
                    "camera": s["camera"], "resolution": s["resolution"], "context_frames": context,
                    "features": "per-frame image tokens, mean-pooled, last context_frames concatenated + proprio (hand xyz, gripper)",
                    "selection_split": "none (fixed BC settings)", "report_split": "seeded rollouts (scenes not in demos)",
                    "seed": ctx.seed, "rollout_decisions": decisions}
        return TaskOutput(per_layer=rows, protocol=protocol, dataset_fingerprint=demos_fingerprint(all_demos),
                          extra={"per_env": per_env}, timing_s=timing)


@contextmanager
def single_thread():
    """One torch thread: the task is many small calls (batch-5 backbone steps between renders,
    batch-64 MLP updates); on a busy 2-core machine two threads cost ~15x more CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

