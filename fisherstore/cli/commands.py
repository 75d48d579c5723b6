"""The subcommands, one function each, registered with :func:`command`; and what they print.

Adding a subcommand is one function registered with :func:`command`: it adds its parser
to the subparsers and sets ``run`` (``args -> exit code``) as the parser's default. The
heavy imports (the store, Phase 6, pictures) happen when a subcommand runs, so
``fisherstore --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from ..backends import location
from ..errors import InvalidArgumentError, NotAFisherStoreError, StoreLockedError, human_bytes
from .demo import run_demo
from .exits import DAMAGED, OK
from .info import store_info

__all__ = ["command", "COMMANDS", "store_dir", "out_file"]


def store_dir(path: str, *, need_doc: bool = True) -> str:
    """``path`` if it is a store's directory (or an ``s3://`` URL), else :class:`NotAFisherStoreError` saying what
    it is instead."""
    path = location(path)
    if "://" in path:
        if need_doc:
            _require_remote_doc(path)
        return path
    if not os.path.exists(path):
        raise NotAFisherStoreError(f"{path}: no such directory. Check the path (`fisherstore demo --out DIR` makes "
                                   "a store to try the commands on).")
    if not os.path.isdir(path):
        hint = f"; the store is its directory, {os.path.dirname(os.path.abspath(path))}" \
            if os.path.basename(path) == "zarr.json" else ""
        raise NotAFisherStoreError(f"{path} is a file, not a store: a fisherstore store is a directory{hint}.")
    if need_doc and not os.path.isfile(os.path.join(path, "zarr.json")):
        raise NotAFisherStoreError(f"{path} is a directory but not a fisherstore store (it has no zarr.json). Give "
                                   "the store's root directory.")
    return path


def _require_remote_doc(url: str) -> None:
    """:class:`NotAFisherStoreError` unless ``url`` holds a store's root document.

    Without it ``verify`` would report a missing bucket or prefix as a damaged store (exit
    1); there is simply no store there (exit 3), as ``info`` says for the same URL.
    """
    from ..backends.hierarchy import open_medium  # obstore: imported only for s3:// locations
    from ..spec.format import DOC

    if not open_medium(url, read_only=True).exists(DOC):
        raise NotAFisherStoreError(f"{url}: no fisherstore store there (no {DOC} at that prefix, or no such bucket). "
                                   "Check the URL.")


def out_file(path: str, default_name: str) -> str:
    """Where a command writes a picture: ``path``, or ``path/default_name`` when ``path`` is a directory.

    As ``cp FILE DIR`` does: an existing directory receives the file under its default
    name (matplotlib would otherwise write ``DIR.png`` beside it). A path with no suffix
    gets ``.png``, so the file printed is the file written. A missing parent directory is
    a usage error (exit 2) before any work is done, not an I/O error after it.
    Usage: ``out_file("figs", "math.png")`` → ``"figs/math.png"``.
    """
    if os.path.isdir(path):
        return os.path.join(path, default_name)
    if not os.path.splitext(path)[1]:
        path += ".png"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidArgumentError(f"cannot write {path}: its directory {parent} does not exist (create it first, "
                                   "or give an existing directory to write into)")
    return path


def _safe_name(text: str) -> str:
    """A task name as part of a file name (a path separator in it would name another directory)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "_"


# -- the subcommand registry ---------------------------------------------------------------
COMMANDS: list[Callable[[Any], None]] = []


def command(setup: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register a subcommand: ``setup(subparsers)`` adds its parser and ``set_defaults(run=...)``."""
    COMMANDS.append(setup)
    return setup


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return n


def _store_args(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("path", help="the store's directory")
    if json_flag:
        p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", choices=("zarr", "tensorstore"), default="zarr")


@command
def _demo(sub: Any) -> None:
    d = sub.add_parser("demo", help="collect two tasks on a tiny model and print a QK-OV table",
                       description="Build a tiny LLaMA-style GQA model, collect two tasks into a Zarr store, "
                                   "read head blocks lazily and print per-(layer, head, block) interference.")
    d.add_argument("--out", help="output directory (default: a new temporary directory)")
    d.add_argument("--backend", choices=("zarr", "tensorstore"), default="zarr")
    d.add_argument("--steps", type=_positive_int, default=3, help="collect_fisher calls per task (at least 1; "
                                                                   "default 3)")

    def run(a: argparse.Namespace) -> int:
        if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
            raise InvalidArgumentError(f"--out {a.out} is a file; the demo writes a store and a PNG into a directory "
                                       "(give a new or existing directory)")
        run_demo(a.out, backend=a.backend, steps=a.steps)
        return OK

    d.set_defaults(run=run)


@command
def _info(sub: Any) -> None:
    p = sub.add_parser("info", help="describe a store",
                       description="Print tasks, parameters, shapes, steps, bytes on disk and compression ratio.")
    _store_args(p)

    def run(a: argparse.Namespace) -> int:
        info = store_info(store_dir(a.path), backend=a.backend)
        if a.json:
            json.dump(info, sys.stdout, indent=1)
            print()
        else:
            _print_info(info)
        return OK

    p.set_defaults(run=run)


@command
def _verify(sub: Any) -> None:
    p = sub.add_parser("verify", help="check every committed chunk of a store",
                       description="Read every chunk of every committed generation and check its crc32c checksum; "
                                   "list what an interrupted writer left behind (rolled back). Exit 0 clean, 1 "
                                   "problems found.")
    _store_args(p)

    def run(a: argparse.Namespace) -> int:
        from ..engine.verify import verify_store

        rep = verify_store(store_dir(a.path), backend=a.backend)
        if a.json:
            json.dump(rep.to_dict(), sys.stdout, indent=1)
            print()
        else:
            _print_verify(rep)
        return OK if rep.ok else DAMAGED

    p.set_defaults(run=run)


@command
def _plot(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw a task's per-block [layer x head] Fisher mass heat map",
                       description="Sum each head block's Fisher (one chunk read each) and draw one [layer x head] "
                                   "panel per block (Q, K, V, O). With --compare, draw both tasks' shares of their "
                                   "own total mass and log2 of their ratio. Needs matplotlib and pandas.")
    _store_args(p, json_flag=False)
    p.add_argument("--task", required=True, help="the task to draw")
    p.add_argument("--compare", metavar="TASK2", help="a second task to compare against --task")
    p.add_argument("--out", required=True,
                   help="the PNG file to write; an existing directory receives TASK.png (with --compare: "
                        "TASK-vs-TASK2.png); a name with no suffix gets .png")

    def run(a: argparse.Namespace) -> int:
        from ..qkov.outofcore import check_same_geometry, require_ema_step
        from ..store.api import open as open_store
        from ..views.plots import plot_mass

        out = out_file(a.out, _safe_name(a.task) + (f"-vs-{_safe_name(a.compare)}" if a.compare else "") + ".png")
        with open_store(store_dir(a.path), mode="r", backend=a.backend) as s:
            for task in [a.task] + ([a.compare] if a.compare else []):
                require_ema_step(s, task, "be drawn", "collect its EMA first (FisherCollector.collect_fisher); "
                                 "its per-sample gradients are scored by `fisherstore qkov --fisher contribution`")
            if a.compare:  # the panels set the two tasks' heads side by side
                check_same_geometry(s, a.task, a.compare, _headed(s, a.task), role="--compare task", role_a="--task")
            df = s.summary(a.task)
            other = s.summary(a.compare) if a.compare else None
        print(plot_mass(df, out, compare=other))
        return OK

    p.set_defaults(run=run)


@command
def _qkov(sub: Any) -> None:
    p = sub.add_parser("qkov", help="score QK-OV interference between two tasks' samples, straight from the store",
                       description="For every (layer, head, block), read task A's per-sample contributions, task B's "
                                   "per-sample gradients and the Fisher block, score all pairs with one matmul, and "
                                   "print the [layer x head] mean per block and the top conflicts. Needs per-sample "
                                   "gradients of both tasks (FisherCollector.collect_samples).")
    _store_args(p)
    p.add_argument("--task-a", required=True, help="the task whose contributions C_i = g_i^2/T_i are scored")
    p.add_argument("--task-b", required=True, help="the task whose gradients g_j/T_j are scored against them")
    p.add_argument("--fisher", choices=("ema", "contribution"), default="ema",
                   help="normalise by the EMA Fisher (default) or the contribution Fisher mean_i C_i")
    p.add_argument("--fisher-task", help="the task whose Fisher normalises (default: --task-a)")
    p.add_argument("--layers", nargs="+", help="layer keys to score (default: all)")
    p.add_argument("--heads", nargs="+", type=int, help="query heads to score (default: all)")
    p.add_argument("--blocks", default="QKVO", help="blocks to score, some of Q, K, V, O, e.g. QK (default QKVO)")
    p.add_argument("--top", type=_positive_int, default=10, help="top conflicts to print per block (default 10)")
    p.add_argument("--png", help="also draw the heat map into this PNG (needs matplotlib); an existing directory "
                                 "receives qkov-A-vs-B.png")

    def run(a: argparse.Namespace) -> int:
        from ..qkov import QKOVIndexer, QKOVInterference, heatmap_png
        from ..qkov.outofcore import require_ema_step
        from ..store.api import open as open_store

        blocks = [b for b in a.blocks.upper() if b not in ", "]  # "QK", "Q,K" and "Q K" alike
        bad = [b for b in blocks if b not in "QKVO"]
        if not blocks or bad:
            raise InvalidArgumentError(f"--blocks {a.blocks!r} selects {'no block' if not blocks else repr(bad[0])}; "
                                       "give one or more of Q, K, V, O (e.g. --blocks QK)")
        if a.png:
            a.png = out_file(a.png, f"qkov-{_safe_name(a.task_a)}-vs-{_safe_name(a.task_b)}.png")
        with open_store(store_dir(a.path), mode="r", backend=a.backend) as s:
            if a.fisher == "ema":
                require_ema_step(s, a.fisher_task or a.task_a, "normalise the scores", _NO_EMA_HINT)
            qk = QKOVInterference(QKOVIndexer.from_store(s, a.task_a))
            layers = [int(v) if v.lstrip("-").isdigit() else v for v in a.layers] if a.layers else None
            heat = qk.heatmap_from_store(s, a.task_a, a.task_b, fisher=a.fisher, fisher_task=a.fisher_task,
                                         layers=layers, heads=a.heads, blocks=blocks)
        blocks = [b for b in "QKVO" if b in heat]
        if a.png:
            heatmap_png(heat, a.png, f"QK-OV interference ({a.task_a} vs {a.task_b}, {a.fisher} Fisher)")
        if a.json:
            json.dump({"task_a": a.task_a, "task_b": a.task_b, "fisher": a.fisher, "layers": heat["layers"],
                       "heads": heat["heads"], "mean": {b: heat[b].tolist() for b in blocks},
                       "top_conflicts": {b: heat["top_conflicts"][b][:a.top] for b in blocks},
                       "png": a.png}, sys.stdout, indent=1)
            print()
            return OK
        print(f"QK-OV interference, {a.task_a} samples x {a.task_b} samples, {a.fisher} Fisher (mean over pairs):")
        print("  layer   head " + " ".join(f"{b:>10s}" for b in blocks))
        for li, layer in enumerate(heat["layers"]):
            for hi, h in enumerate(heat["heads"]):
                print(f"  {layer!s:>7s} {h:4d} " + " ".join(f"{heat[b][li, hi]:10.3e}" for b in blocks))
        for b in blocks:
            print(f"  top {b} conflicts: " + "; ".join(
                f"{c['sample_i']} x {c['sample_j']} at layer {c['layer']} head {c['head']}: {c['score']:.3e}"
                for c in heat["top_conflicts"][b][:a.top]))
        if a.png:
            print(f"  heat map: {a.png}")
        return OK

    p.set_defaults(run=run)


@command
def _import_adam(sub: Any) -> None:
    p = sub.add_parser("import-adam", help="store an Adam/AdamW checkpoint's exp_avg_sq as a task's EMA Fisher",
                       description="Write the exp_avg_sq of a saved torch Adam/AdamW state_dict (a Hugging Face "
                                   "Trainer checkpoint's optimizer.pt) into a new task of a store, with EMA β = β2 "
                                   "at the optimizer's step: the task's readout is exp_avg_sq / (1 - β2^t). The "
                                   "parameter names come from the model built (random weights, on the meta device) "
                                   "from the checkpoint's config.json. See docs/estimators.md.")
    p.add_argument("ckpt", metavar="CKPT", help="a checkpoint directory holding optimizer.pt (and config.json), or "
                                                "the path of an optimizer.pt")
    p.add_argument("--store", required=True, help="the store's directory (created if missing)")
    p.add_argument("--task", required=True, help="the new task to write (must not exist in the store)")
    p.add_argument("--model", metavar="DIR", help="a directory with the model's config.json (default: CKPT's "
                                                  "directory)")
    p.add_argument("--tokens-per-step", type=_positive_int, metavar="N",
                   help="tokens one optimizer step's loss averaged over; scales the state by N to the collector's "
                        "'batch' estimator (default: stored as Adam keeps it)")
    p.add_argument("--param-order", choices=("auto", "model", "trainer"), default="auto",
                   help="how the state_dict's indices map to names: 'model' (named_parameters order, as "
                        "Adam(model.parameters()) numbers them), 'trainer' (HF Trainer's: weight-decayed "
                        "parameters first); 'auto' (default): 'trainer' when the checkpoint directory holds "
                        "trainer_state.json, else 'model'")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backend", choices=("zarr", "tensorstore"), default="zarr")

    def run(a: argparse.Namespace) -> int:
        from ..errors import ShapeMismatchError
        from ..optimizers.adam import import_adam, trainer_param_names

        opt_file, ckpt_dir = _optimizer_file(a.ckpt)
        order = a.param_order
        if order == "auto":
            order = "trainer" if os.path.isfile(os.path.join(ckpt_dir, "trainer_state.json")) else "model"
        model = _model_from_config(a.model or ckpt_dir, given=a.model is not None)
        names = trainer_param_names(model) if order == "trainer" else None
        try:
            res = import_adam(a.store, a.task, model, opt_file, a.tokens_per_step, param_names=names,
                              backend=a.backend)
        except ShapeMismatchError as e:  # the order was wrong: a usage error, said in command-line words
            other = "model" if order == "trainer" else "trainer"
            raise InvalidArgumentError(
                f"{str(e).partition(': the state_dict')[0]}: the state_dict's indices are not in the {order!r} order. "
                f"Try --param-order {other}, or check that --model describes the model that trained") from e
        if a.json:
            json.dump({"store": a.store, "task": res.task, "step": res.step, "beta2": res.beta2,
                       "tokens_per_step": res.tokens_per_step, "param_order": order, "source": res.source,
                       "params": res.params}, sys.stdout, indent=1)
            print()
        else:
            scale = f", scaled by tokens_per_step={res.tokens_per_step}" if res.tokens_per_step else ""
            print(f"{a.store}: task {res.task!r} holds Adam's exp_avg_sq of {len(res.params)} parameters at step "
                  f"{res.step} (β2={res.beta2}{scale}) from {res.source}")
        return OK

    p.set_defaults(run=run)


def _optimizer_file(ckpt: str) -> tuple[str, str]:
    """``(optimizer.pt, the directory holding it)`` of ``import-adam``'s CKPT, or a usage error saying what is there."""
    if os.path.isdir(ckpt):
        path = os.path.join(ckpt, "optimizer.pt")
        if not os.path.isfile(path):
            raise InvalidArgumentError(f"{ckpt} holds no optimizer.pt; give a checkpoint directory the Trainer saved "
                                       "with its optimizer state, or the optimizer state file itself")
        return path, ckpt
    if not os.path.isfile(ckpt):
        raise InvalidArgumentError(f"{ckpt}: no such file or directory. Give a checkpoint directory holding "
                                   "optimizer.pt, or an optimizer.pt")
    return ckpt, os.path.dirname(os.path.abspath(ckpt))


def _model_from_config(model_dir: str, *, given: bool) -> Any:
    """The model a ``config.json`` describes, on the meta device: its names, order and shapes, no weights."""
    from ..errors import require

    cfg_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_file):
        where = f"--model {model_dir}" if given else f"the checkpoint's directory {model_dir}"
        raise InvalidArgumentError(f"{where} holds no config.json, and the parameter names come from the model's "
                                   "config: pass --model DIR, a directory holding the model's config.json")
    transformers = require("transformers", "fisherstore import-adam", extra="hf")
    import torch

    transformers.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
        cls = getattr(transformers, (getattr(cfg, "architectures", None) or [""])[0], None)
        with torch.device("meta"):  # only names, order and shapes are read: no memory for weights
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                return cls(cfg)
            auto = transformers.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else transformers.AutoModelForCausalLM
            return auto.from_config(cfg)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgumentError(f"{cfg_file}: transformers could not build a model from it ({e}). Pass --model "
                                   "DIR with the config.json of the model that trained") from e


@command
def _unlock_cmd(sub: Any) -> None:
    u = sub.add_parser("unlock", help="remove a stale writer lock",
                       description="Remove the writer lock of a process that is gone (pidfile locks; an "
                                   "flock lock is released by the kernel when its writer dies). On s3:// the lock "
                                   "is a lease: it is removed only once it has expired (FISHERSTORE_LOCK_TTL "
                                   "seconds, default 60, after its writer's last heartbeat).")
    u.add_argument("path", help="the store's directory, or s3://bucket/prefix")
    u.add_argument("--force", action="store_true", help="required: confirm the writer is gone")
    u.set_defaults(run=lambda a: _unlock(store_dir(a.path, need_doc=False), a.force))


#: What to do instead of reading an EMA with no step, in command-line words.
_NO_EMA_HINT = ("pass --fisher contribution (the mean of its per-sample contributions), or collect its EMA first "
                "(FisherCollector.collect_fisher)")


def _headed(s: Any, task: str) -> list[str]:
    """The parameters of ``task`` with head layouts: those a [layer x head] picture draws."""
    return [n for n in s.params(task) if (lay := s.layout(task, n)) is not None and lay.has_heads]


def _print_info(info: dict[str, Any]) -> None:
    ratio = info["compression_ratio"]
    print(f"{info['path']}  (format {info['format_version']}, {info['written_by']})")
    print(f"  codecs: {info['codecs']}")
    print(f"  {human_bytes(info['bytes'])} of fp32 state, {human_bytes(info['bytes_on_disk'])} committed on disk"
          + (f" (+{human_bytes(info['other_bytes_on_disk'])} metadata and uncommitted)" if info["other_bytes_on_disk"] else "")
          + (f", chunk compression {ratio:.3f}x" if ratio else ""))
    for task, t in info["tasks"].items():
        smp = t["samples"]
        kind = t.get("fisher_type")
        kind = f" ({kind}" + (f", {t['mc_samples']} draws" if t.get("mc_samples") else "") + ")" if kind else ""
        print(f"  task {task!r}: step {t['step']}, {t['tokens_seen']} tokens, estimator {t['estimator']}{kind}, "
              f"{len(t['params'])} params"
              + (f"; per-sample gradients: {smp['n']} samples of {len(smp['params'])} params "
                 f"({'/'.join(smp['dtypes'])}, {human_bytes(smp['bytes'])})" if smp["n"] else ""))
        for name, p in t["params"].items():
            kind = (p["layout"] or {}).get("kind", "-")
            print(f"    {name:50s} {kind:5s} {str(tuple(p['shape'])):16s} chunks {str(tuple(p['chunks'])):14s} "
                  f"{human_bytes(p['chunk_bytes_on_disk']):>10s}")


def _print_verify(rep: Any) -> None:
    print(f"{rep.path}: {'clean' if rep.ok else f'{len(rep.problems)} problem(s)'} "
          f"({rep.chunks_checked} chunks, {human_bytes(rep.bytes_checked)} checked)")
    for f in rep.problems:
        print(f"  PROBLEM {f.kind}: {f.message}")
    for f in rep.rolled_back:
        print(f"  rolled back ({f.kind}): {f.message}")
    for n in rep.notes:
        print(f"  note: {n}")


def _unlock(path: str, force: bool) -> int:
    from ..engine.lock import LOCK_NAME, StoreLock, holder_alive, read_holder

    if path.startswith("s3://"):
        return _unlock_object(path, force)
    lock_path = os.path.join(path, LOCK_NAME)
    holder = read_holder(lock_path)
    if not os.path.exists(lock_path) or not holder:
        print(f"{path}: no writer lock is held")
        return OK
    if not force:
        raise InvalidArgumentError(f"{path} has a writer lock record from pid {holder.get('pid')} on host "
                                   f"{holder.get('host')}; pass --force to remove it once you are sure that writer "
                                   "is gone")
    if holder_alive(holder):
        raise StoreLockedError(f"pid {holder['pid']} on this host still runs and holds the store {path}; stop it "
                               "first (or let it finish)")
    lock = StoreLock(path, force=True)
    lock.acquire()  # raises StoreLockedError if a live writer really holds it
    lock.release()
    print(f"{path}: removed the stale lock of pid {holder.get('pid')} on host {holder.get('host')}")
    return OK


def _unlock_object(url: str, force: bool) -> int:
    """``unlock`` on object storage: the lock object goes only once its lease has expired."""
    from ..backends.hierarchy import open_medium
    from ..engine.lock import LeaseState, break_object_lock

    medium = open_medium(url, read_only=False)
    state = LeaseState.read(medium, measure=False)
    if state is None:
        print(f"{url}: no writer lock is held")
        return OK
    if not force:
        raise InvalidArgumentError(f"{url} has a writer lock from {state.describe(url)}; pass --force to remove it "
                                   "once you are sure that writer is gone (a live writer's lease is never removed)")
    removed = break_object_lock(medium)  # StoreLockedError (exit 4) while the lease is live
    if removed is None:
        print(f"{url}: no writer lock is held")
    else:
        print(f"{url}: removed the expired lock of {removed.describe(url)}")
    return OK
