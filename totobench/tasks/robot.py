"""Robot manipulation in MetaWorld: behaviour cloning on frozen features, closed-loop success.

Per MetaWorld task: the expert demonstrations (totobench.data.robot, rendered once and cached)
go through the backbone once (through the feature cache; shared out among the ranks under
torchrun); each frame is read as an image and mean-pooled per layer. For each
requested layer, an MLP policy (probes/bc_policy.py) maps [pooled features of the last
`context_frames` frames, proprioception] to the expert's action. The policy then drives the
simulator from seeded initial scenes never seen in the demos; an episode is a success when
`info["success"]` fires within `episode_length` decisions. Metrics per layer: the success rate per
task ("success/<task>"), their mean ("success") and its standard error over all episodes ("success_se").

Rollouts of one layer run in lockstep on a pool of environments created once per task (each with
its own renderer) and reused for every layer, so each decision step is one batched backbone call
that stops at that layer. Frame features are computed once and kept in a sliding history. Under
torchrun the rollouts run on rank 0 (the simulator steps are sequential); the other ranks wait.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from totobench.errors import ConfigError
from totobench.features.estimate import SplitEstimate, TaskEstimate, split_estimate
from totobench.features.extract import extract_features
from totobench.probes.base import POLICY, ProbeData
from totobench.paths import portable_path
from totobench.progress import progress_bar
from totobench.tasks.base import DatasetSpec, Evaluation, InputSpec, LayerRow, QuickSpec, RunContext, Task
MAX_POOL = 10     # simulators (each with a GL context) stepped in lockstep; more seeds take turns


def success_standard_error(rate: float, episodes: int) -> float:
    """Standard error of a success rate measured on `episodes` independent episodes:
    sqrt(p (1 - p) / n). Two models whose rates differ by less than about twice this are within noise."""
    return float(np.sqrt(rate * (1.0 - rate) / episodes))


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
            out[i].append(f[:, 0].mean(dim=(1, 2)).float().cpu().numpy())
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


@dataclass(frozen=True)
class RobotDataset(DatasetSpec):
    """`dataset:` the MetaWorld tasks and how demonstrations and rollouts are made."""
    format: str = "metaworld"
    env: tuple[str, ...] = field(default=("drawer-open", "button-press-topdown", "pick-place"),
                                 metadata={"nonempty": True})
    demos: int = field(default=25, metadata={"min": 1})             # expert demonstrations per task
    rollouts: int = field(default=5, metadata={"min": 1})           # seeded evaluation episodes per task and layer
    episode_length: int = field(default=40, metadata={"min": 1})    # policy decisions per episode
    action_repeat: int = field(default=3, metadata={"min": 1})      # physics steps per decision
    camera: str = "corner3"


@dataclass(frozen=True)
class RobotInput(InputSpec):
    context_frames: int = field(default=3, metadata={"min": 1})     # pooled features of the last frames, concatenated


@dataclass(frozen=True)
class RobotQuick(QuickSpec):
    demos: int = field(default=5, metadata={"min": 1})
    rollouts: int = field(default=1, metadata={"min": 1})
    episode_length: int = field(default=10, metadata={"min": 1})


class RobotBC(Task):
    kind = "robot_bc"
    Dataset = RobotDataset
    Input = RobotInput
    Quick = RobotQuick
    consumes = POLICY
    default_probe = "bc_mlp"

    @classmethod
    def metric_names(cls, cfg) -> tuple[str, ...]:
        return ("success", "success_se") + tuple(f"success/{env}" for env in cfg.dataset.env)

    @property
    def report_split(self) -> str:
        return "seeded rollouts (scenes not in demos)"

    def deviations(self, spec, inputs: dict, ctx: RunContext) -> list[str]:
        s = self._settings(ctx)
        return super().deviations(spec, inputs, ctx) + [
            f"MetaWorld behaviour cloning ({len(self.cfg.dataset.env)} tasks, {s['demos']} demos, {s['rollouts']} "
            f"rollouts of {s['episode_length']} decisions, {spec.epochs} epochs, camera {s['camera']}); the paper "
            f"trains PPO in IsaacGym and clones a real Franka, and CortexBench uses 5 tasks, 25 demos, 25 rollouts x "
            f"3 seeds of 500 steps, 100 epochs, camera top_cap2 (not in MetaWorld 3.1.1)"]

    def resolve_input(self, backbone) -> dict:
        inputs = super().resolve_input(backbone)
        if inputs["resolution"] != backbone.inputs.resolution:
            raise ConfigError(f"{self.cfg.path}: input.resolution must be null or the model's resolution "
                              f"{backbone.inputs.resolution}, got {inputs['resolution']}")
        return inputs

    def _settings(self, ctx: RunContext) -> dict:
        """The dataset settings with --quick limits applied (demos keep their full length)."""
        ds = self.cfg.dataset
        s = {key: getattr(ds, key) for key in ("demos", "rollouts", "episode_length", "action_repeat", "camera")}
        s["demo_length"] = s["episode_length"]
        for key in ("demos", "rollouts", "episode_length"):
            limit = self.quick_limit(key, ctx.quick)
            if limit is not None:
                s[key] = min(s[key], limit)
        return s

    def estimate(self, ctx: RunContext, inputs: dict, spec) -> TaskEstimate:
        """The demo frames (images, pooled, through the cache: what the policies train on) and the
        rollouts' forwards (one per decision and layer, stopping at that layer; never stored).
        Upper bounds: every demo and episode runs its full length. Nothing streams."""
        s, res = self._settings(ctx), inputs["resolution"]
        envs = len(self.cfg.dataset.env)
        demos = split_estimate(ctx.backbone, ctx.layers, "train", envs * s["demos"] * s["demo_length"], 1, res, res,
                               "image", spec.pooling)
        decisions = envs * s["rollouts"] * s["episode_length"]
        per_layer = [split_estimate(ctx.backbone, [layer], "rollouts", decisions, 1, res, res, "image", "mean",
                                    store=False) for layer in ctx.layers]
        rollouts = SplitEstimate("rollouts", decisions * len(ctx.layers), 0, ctx.backbone.dim, 0, 0,
                                 sum(e.forward_tokens for e in per_layer), sum(e.flops for e in per_layer))
        return TaskEstimate.of(self.name, [demos, rollouts], ctx.cache_budget, streamable=False)

    def evaluate(self, ctx: RunContext, inputs: dict, spec) -> Evaluation:
        with single_thread():
            return self._evaluate(ctx, inputs, spec)

    def _evaluate(self, ctx: RunContext, inputs: dict, spec) -> Evaluation:
        from totobench.data.robot import demos_fingerprint, metaworld_name, rollout_seed, short_name
        s = {**self._settings(ctx), "resolution": inputs["resolution"], "context": inputs["context_frames"]}
        envs = [short_name(metaworld_name(e)) for e in self.cfg.dataset.env]
        seeds = [rollout_seed(ctx.seed, j) for j in range(s["rollouts"])]
        run = RolloutLog(ctx.layers)
        all_demos = {}
        with progress_bar(ctx.console) as progress:
            for name in envs:
                all_demos[name] = self._evaluate_env(ctx, name, s, spec, seeds, run, progress)
        rows = []
        for layer in ctx.layers:
            metrics = {"success": float(np.mean([run.rates[layer][n] for n in envs]))}
            metrics.update({f"success/{n}": run.rates[layer][n] for n in envs})
            metrics["success_se"] = success_standard_error(metrics["success"], len(envs) * len(seeds))
            rows.append(LayerRow(layer=layer, metrics=metrics))
        facts = {"envs": envs, "demos_per_env": s["demos"], "rollouts_per_env": s["rollouts"],
                 "episode_length": s["episode_length"], "action_repeat": s["action_repeat"], "camera": s["camera"],
                 "features": "per-frame image tokens, mean-pooled, last context_frames concatenated + proprio "
                             "(hand xyz, gripper)", "rollout_decisions": run.decisions}
        return Evaluation(rows=rows, fingerprint=demos_fingerprint(all_demos), facts=facts,
                          extra={"per_env": run.per_env}, timing=run.timing())

    def _evaluate_env(self, ctx: RunContext, name: str, s: dict, spec, seeds: list[int], run: "RolloutLog",
                      progress) -> dict:
        """Demos, their features, a policy per layer and its rollouts for one MetaWorld task."""
        from totobench.data.robot import RobotEnv, demos_fingerprint, load_or_record_demos
        t0 = time.perf_counter()
        job = progress.add_task(f"{name} demos", total=s["demos"], rate="")
        demos, path = load_or_record_demos(
            ctx.data_root, name, s["demos"], s["resolution"], ctx.seed, s["demo_length"],
            s["action_repeat"], s["camera"], on_episode=lambda: progress.update(job, advance=1))
        progress.update(job, completed=s["demos"])
        t1 = time.perf_counter()
        lengths = demos["length"]
        frames = np.concatenate([demos["frames"][e, :n] for e, n in enumerate(lengths)])
        cached = extract_features(
            ctx.backbone, DemoFrames(frames), ctx.layers, kind="image", pooling=spec.pooling, cache=ctx.cache,
            key_parts={"transform": f"robot-demo-frames-{s['resolution']}", "task": name,
                       "dataset": demos_fingerprint({name: demos})},
            batch_size=ctx.batch_size, device=ctx.device, console=None, desc=f"{name} demo features")
        t2 = time.perf_counter()
        actions = np.concatenate([demos["actions"][e, :n] for e, n in enumerate(lengths)])
        proprio = np.concatenate([demos["proprio"][e, :n] for e, n in enumerate(lengths)])
        inputs = {layer: np.concatenate([stack_context(np.asarray(cached.feats[layer], dtype=np.float32), lengths,
                                                       s["context"]), proprio], axis=1) for layer in ctx.layers}
        policies = self.probe.fit(ProbeData(feats=inputs, targets=actions), None, spec, self.probe_context(ctx))
        t3 = time.perf_counter()
        pool = [RobotEnv(name, s["resolution"], s["camera"], s["action_repeat"]) for _ in range(min(len(seeds), MAX_POOL))]
        run.add_time(demos=t1 - t0, demo_features=t2 - t1, train=t3 - t2, env_setup=time.perf_counter() - t3)
        run.per_env[name] = {"demos_file": portable_path(path), "num_demos": int(len(lengths)),
                             "demo_steps": int(lengths.sum()), "rollout_seeds": seeds, "layers": {}}
        job = progress.add_task(f"{name} rollouts", total=len(ctx.layers) * len(seeds), rate="")
        try:
            for layer in ctx.layers:
                def featurize(frames, layer=layer):
                    return pooled_features(ctx.backbone, frames, [layer], ctx.batch_size, ctx.device)[0]
                t0, c0 = time.perf_counter(), time.process_time()
                res = run_rollouts(pool, seeds, policies[layer].outputs, featurize, s["context"], s["episode_length"])
                seconds = time.perf_counter() - t0
                run.add_rollouts(name, layer, res, policies[layer].facts, seconds, time.process_time() - c0)
                progress.update(job, advance=len(seeds), rate=f"{1e3 * seconds / max(res['decisions'], 1):.0f} ms/step")
        finally:
            for env in pool:
                env.close()
        return demos


class RolloutLog:
    """Success rates, per-episode records and timings of a robot run."""

    def __init__(self, layers: list[int]):
        self.rates: dict[int, dict[str, float]] = {layer: {} for layer in layers}
        self.per_env: dict[str, dict] = {}
        self.decisions = 0
        self.rollout_cpu = 0.0
        self.cpu0 = time.process_time()
        self.seconds = {"demos": 0.0, "demo_features": 0.0, "train": 0.0, "env_setup": 0.0, "rollout": 0.0}

    def add_time(self, **seconds: float) -> None:
        for key, value in seconds.items():
            self.seconds[key] += value

    def add_rollouts(self, env: str, layer: int, res: dict, fit: dict, seconds: float, cpu: float) -> None:
        rate = float(np.mean(res["success"]))
        self.rates[layer][env] = rate
        self.per_env[env]["layers"][str(layer)] = {"success": rate, "successes": res["success"], "steps": res["steps"],
                                                   "train_mse": fit["train_mse"], "train_steps": fit["train_steps"]}
        self.decisions += res["decisions"]
        self.seconds["rollout"] += seconds
        self.rollout_cpu += cpu

    def timing(self) -> dict[str, float]:
        return {**self.seconds, "rollout_step": self.seconds["rollout"] / max(self.decisions, 1),
                "rollout_step_cpu": self.rollout_cpu / max(self.decisions, 1), "cpu": time.process_time() - self.cpu0}


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

