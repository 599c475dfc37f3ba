"""Training on several processes (CPU) or GPUs with PyTorch's DistributedDataParallel.

Launched by PyTorch's own launcher, one process per CPU share or GPU::

    torchrun --standalone --nproc-per-node 2 -m charlstm train --dataset tinyshakespeare ...
    charlstm train --nproc 2 ...          # the same, torchrun started for you

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `orchestrate.train` sees them, joins the process
group (gloo on CPU, NCCL on CUDA) and trains a `DistributedRun` instead of a `Run`. What each
process does:

* **The same global batch.** Every process runs the same batcher (same seed, same state) and keeps
  its own rows: with B streams and N processes, rank r trains rows r·B/N … (r+1)·B/N − 1 and carries
  their hidden state. One process and N processes see the same batches, and the batcher's state in a
  checkpoint is global, so a run resumes with any N that divides B.
* **Gradients averaged** by DDP during backward; each process's loss is the mean over its rows, so
  the average of the N gradients is the gradient of the global mean loss. Adam, clipping and the
  weight average then see identical numbers everywhere and the weights stay identical bit for bit.
  (With many documents a row's padded targets are ignored, so processes may average over slightly
  different counts: the mean of their means weights a target a little unequally, identically on
  every process.)
* **Agreed decisions.** Before every step the processes agree on the elapsed time and on any stop
  signal (one tiny all-reduce), and the loss they log and test for finiteness is the global mean
  (one more): the time budget, the cosine schedule, Ctrl-C and a skipped non-finite step are decided
  once for all. The validation loss is summed over the evaluation streams, each process taking some
  of them, then broadcast from rank 0, so early stopping and the plateau schedule agree too.
* **Rank 0 writes** metrics, samples and checkpoints; before a ``last/`` save the others send it
  their rows of the hidden state and their random-generator states, so the checkpoint holds the
  global state.
* **Failures.** A process that dies makes the others' next collective fail (or time out after
  ``CHARLSTM_DIST_TIMEOUT`` seconds, default 300); they end with one line saying so, and torchrun's
  agent stops whatever is left. Checkpoints are written atomically, so ``last/`` stays loadable.

* **Trust.** The processes exchange tensors only (never the pickled objects of PyTorch's
  ``*_object`` collectives, which would run whatever a peer sent), but the rendezvous and gloo/NCCL
  traffic are neither authenticated nor encrypted, and torchrun's rendezvous unpickles the state in
  its store: anyone who reaches those ports can join or disturb the job. Run jobs that span
  machines on a network you trust (docs/guide.md, Multi-process training).

Dropout differs per process (each has its own generator, seeded from the run's seed and its rank),
so a run with dropout is not bitwise the same on 1 and N processes; without dropout it is the same
up to floating-point summation order (see tests/test_distributed.py for the tolerance).
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from charlstm.data.batching import Batch
from charlstm.errors import UserError
from charlstm.hardware import available_cores, pick_device, set_threads
from charlstm.model import hidden_from_tensors, hidden_tensors
from charlstm.model.evaluation import loss_sums
from charlstm.runs.folder import RunFolder
from charlstm.training.loop import Run

TIMEOUT_ENV = "CHARLSTM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
# A process's dropout generator: the run's seed moved by a large prime per rank (rank 0 keeps the
# seed itself, so a 1-process run under torchrun is a plain run).
RANK_SEED_STRIDE = 1_000_003


@dataclass(frozen=True)
class Context:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: (
        torch.device
    )  # where collectives' tensors live: CPU for gloo, this process's GPU for NCCL


_context: Context | None = None


def broadcast_json(doc: Any, ctx: Context) -> Any:
    """Rank 0's JSON-able `doc` on every process (what the others pass is ignored). Sent as bytes
    in tensors, never pickled: a peer's bytes are only ever parsed as JSON."""
    data = json.dumps(doc).encode("utf-8") if ctx.rank == 0 else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=ctx.device)
    dist.broadcast(size, src=0)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=ctx.device)
    if ctx.rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buf, src=0)
    return json.loads(bytes(buf.cpu().tolist()).decode("utf-8"))


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


_finished = False


def setup(device: str = "auto") -> Context | None:
    """Join the job's process group when launched by torchrun with more than one process (once per
    process; left at exit); None otherwise."""
    global _context
    if _context is not None:
        return _context
    world = world_size_from_env()
    if world <= 1:
        return None
    env = {k: int(os.environ[k]) for k in ("RANK", "LOCAL_RANK") if k in os.environ}
    if len(env) < 2 or "MASTER_ADDR" not in os.environ:
        raise UserError(
            "WORLD_SIZE is set but RANK, LOCAL_RANK or MASTER_ADDR is not; start "
            "distributed training with torchrun (or charlstm train --nproc N)"
        )
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    timeout = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))
    on_gpu = pick_device(device).type == "cuda"
    if on_gpu:
        if env["LOCAL_RANK"] >= torch.cuda.device_count():
            raise UserError(
                f"{local_world} processes on this machine but only "
                f"{torch.cuda.device_count()} GPUs; use --nproc-per-node "
                f"{torch.cuda.device_count()} or --device cpu"
            )
        torch.cuda.set_device(env["LOCAL_RANK"])
    backend = "nccl" if on_gpu else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    atexit.register(_teardown)
    comm = torch.device("cuda", env["LOCAL_RANK"]) if on_gpu else torch.device("cpu")
    _context = Context(
        dist.get_rank(), dist.get_world_size(), env["LOCAL_RANK"], local_world, backend, comm
    )
    return _context


def finish() -> None:
    """Mark a distributed run that completed normally, after every process has got this far.

    The process group is closed at exit (`_teardown`), after one more barrier: without it the first
    process to leave tears gloo down while a peer may still be in its last collective, and that peer
    aborts ("terminate called without an active exception"), which failed a 2-process test about one
    run in several on the loaded 2-core machine. A run that failed skips the barrier, since a dead
    peer would never reach it."""
    global _finished
    if dist.is_initialized():
        dist.barrier()
        _finished = True


def _teardown() -> None:
    global _context
    if dist.is_initialized():
        try:
            if _finished:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001, S110 - a dead peer can fail teardown; we exit anyway
            pass
    _context = None


class PeerFailure(UserError):
    """A collective failed: another process of the job died, was stopped, or stopped answering.

    Its own exit status, 3 (docs/errors.md): not 2, since nothing the user gave was wrong, and not
    1, which means a bug in charlstm; the checkpoint is intact and the job can be resumed."""

    exit_code = 3


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        word in text
        for word in (
            "gloo",
            "Gloo",
            "NCCL",
            "Connection closed",
            "Connection reset",
            "Broken pipe",
            "timed out",
            "Timed out",
        )
    )


class RowShard:
    """This process's rows of a batcher that every process runs in step (see the module doc)."""

    def __init__(self, batcher, rows: slice) -> None:
        self.batcher = batcher
        self.rows = rows

    def next(self) -> Batch:
        b = self.batcher.next()  # (B, T) for all B streams: the same on every process
        reset_rows = None if b.reset_rows is None else b.reset_rows[self.rows]
        return Batch(b.x[self.rows], b.y[self.rows], b.reset, reset_rows)  # (B/N, T)

    def state_dict(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


class DistributedRun(Run):
    """A `Run` that is one of `ctx.world_size` processes training the same model."""

    def __init__(
        self,
        config,
        folder: RunFolder,
        data,
        log: Callable[[str], None],
        progress: bool,
        ctx: Context,
    ) -> None:
        B, N = config.data.batch_size, ctx.world_size
        if B % N:
            raise UserError(
                f"--batch-size {B} does not split evenly over {N} processes; use a "
                f"multiple of {N} (each process trains batch_size / {N} streams)"
            )
        self.ctx = ctx
        super().__init__(
            config, folder, data, log if ctx.rank == 0 else _quiet, progress and ctx.rank == 0
        )
        self.writer = ctx.rank == 0
        # Each process gets its share of the cores unless --threads says otherwise.
        self.threads = set_threads(
            config.train.threads or max(1, available_cores() // ctx.local_world_size)
        )
        per = B // N
        self.rows = slice(ctx.rank * per, (ctx.rank + 1) * per)
        self.batcher = RowShard(self.batcher, self.rows)
        self._check_same_job(data)
        if ctx.rank:
            torch.manual_seed(config.train.seed + RANK_SEED_STRIDE * ctx.rank)
        self.log(
            f"charlstm: {N} processes ({ctx.backend}), {per} of the {B} streams each, "
            f"{self.threads} threads each"
        )

    # -- agreement ------------------------------------------------------------------------------

    def _check_same_job(self, data) -> None:
        """Every process must train the same configuration on the same text: a node with another
        copy of the corpus would otherwise train on different data without a word."""
        doc = json.dumps(
            [self.config.to_dict(), data.vocab.to_list(), len(data.train_ids), len(data.val_ids)],
            sort_keys=True,
            ensure_ascii=False,
        )
        # The digests travel as tensors of bytes: the *_object collectives would unpickle what a
        # peer sends, and a peer is any process that reaches the rendezvous port.
        mine = torch.frombuffer(bytearray(hashlib.sha256(doc.encode()).digest()), dtype=torch.uint8)
        everyone = self._gather(mine)
        if any(not torch.equal(d, everyone[0]) for d in everyone):
            raise UserError(
                "the processes of this job disagree on the configuration, the vocabulary "
                "or the corpus; give every node the same corpus and the same options"
            )

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if _is_collective_failure(exc):
                raise self._peer_failure(exc) from None
            raise

    def _peer_failure(self, exc: BaseException) -> PeerFailure:
        # gloo's messages start with a source location and run on: keep the first sentence
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().split("\n")[0]).split(". ")[0]
        first = first or type(exc).__name__
        saved = (
            f"the last checkpoint (step {self.last_saved_step}) is intact"
            if self.last_saved_step is not None
            else "no checkpoint had been written yet"
        )
        return PeerFailure(
            f"rank {self.ctx.rank} of {self.ctx.world_size}: another process of this job stopped "
            f"or stopped answering ({first[:160]}); the job ends here and {saved}; continue with: "
            f"charlstm train --resume {self.out} --nproc {self.ctx.world_size}"
        )

    def sync_step(self, guard) -> bool:
        """Agree on the elapsed time (the largest) and on a stop signal (any process's).

        The decision is the agreed flag, never this process's own: a signal whose handler runs while
        the all-reduce is in flight (or just after it) was not in the flags this process sent, so
        acting on it would stop this process alone while its peers go on to the next step's
        collectives, and the job would hang until the timeout (seen: 2 runs in 3 of
        test_ctrl_c_stops_every_process_at_the_same_step). Such a signal is sent at the next
        step."""
        requested = guard.requested.value if guard.requested is not None else 0
        flags = torch.tensor(
            [self.state.progress.elapsed, float(requested)],
            dtype=torch.float64,
            device=self.ctx.device,
        )
        self._collective(dist.all_reduce, flags, op=dist.ReduceOp.MAX)
        self.state.progress.elapsed = float(flags[0])
        agreed = int(flags[1])
        if agreed and guard.requested is None:
            guard.requested = signal.Signals(agreed)
        return bool(agreed)

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global mean of the processes' losses, so that every process logs the same loss and
        takes the same decision on a non-finite one."""
        mean = loss.detach().clone()
        self._collective(dist.all_reduce, mean)
        mean /= self.ctx.world_size
        # The value is the global mean (a NaN anywhere makes every process skip the step); the
        # gradient is still this process's own, which DDP averages.
        return loss + (mean - loss.detach())

    def _wrap(self) -> torch.nn.Module:
        """DDP broadcasts rank 0's weights and averages gradients in buckets during backward. The
        raw module stays `self.model` (checkpoints, evaluation, the weight average); only the
        training forward goes through the wrapper. Wrapped at the first step, once `train` has
        loaded, initialised and frozen the weights: DDP reduces only the weights that train."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.ctx.local_rank] if self.device.type == "cuda" else None
        return self._collective(DDP, self.model, device_ids=ids)

    def train_step(self, batch):
        if self.train_model is self.model:
            self.train_model = self._wrap()
        try:
            return super().train_step(batch)
        except Exception as exc:
            if _is_collective_failure(exc):  # DDP's all-reduce inside backward
                raise self._peer_failure(exc) from None
            raise

    # -- evaluation ------------------------------------------------------------------------------

    def evaluate(self, model: torch.nn.Module | None = None, *, full: bool = False) -> float:
        mine = slice(self.ctx.rank, None, self.ctx.world_size)  # every N-th row from its rank on
        total, count = loss_sums(
            self.eval_model if model is None else model,
            self.data.val_ids,
            device=self.device,
            precision=self.precision,
            reading=self.eval_reading(full).rows(mine),
            starts=self.data.val_starts,
        )
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.ctx.device)
        self._collective(dist.all_reduce, sums)
        val = (sums[0] / sums[1]).reshape(1)
        self._collective(
            dist.broadcast, val, src=0
        )  # bit-identical on every process, by construction
        return float(val)

    # -- checkpoints -----------------------------------------------------------------------------

    def _gather(self, local: torch.Tensor) -> list[torch.Tensor]:
        """`local` from every process (the same shape and dtype on each), in rank order, on the
        CPU. Tensors only: a peer's bytes are never unpickled."""
        parts = [
            torch.empty_like(local, device=self.ctx.device) for _ in range(self.ctx.world_size)
        ]
        self._collective(dist.all_gather, parts, local.contiguous().to(self.ctx.device))
        return [p.cpu() for p in parts]

    def _gather_rows(self, local: torch.Tensor) -> torch.Tensor:
        """(layers, B/N, H) from every process → (layers, B, H), in rank order."""
        parts = [torch.empty_like(local) for _ in range(self.ctx.world_size)]
        self._collective(dist.all_gather, parts, local.contiguous().to(self.ctx.device))
        return torch.cat(parts, dim=1)

    def global_hidden(self):
        """(layers, B, H) from every process's (layers, B/N, H) rows; a collective, so every
        process calls it before a last/ save."""
        if self.hidden is None:
            return None
        parts = [self._gather_rows(h) for h in hidden_tensors(self.hidden)]
        return hidden_from_tensors(parts, self.config.model.cell)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """Every process's random generators (rank 0's are the run's own rng.* tensors)."""
        tensors = {"dist.world_size": torch.tensor([self.ctx.world_size])}
        # A generator's state is a fixed-size byte tensor (the same size on every process of the
        # job), so it is gathered like any tensor.
        for rank, state in enumerate(self._gather(torch.get_rng_state())):
            if rank:
                tensors[f"rng.rank{rank}.cpu"] = state
        if self.device.type == "cuda":
            for rank, state in enumerate(self._gather(torch.cuda.get_rng_state(self.device))):
                if rank:
                    tensors[f"rng.rank{rank}.cuda"] = state
        return tensors

    def restore(self, ck) -> None:
        super().restore(ck)  # the global state: all B streams' hidden state, rank 0's generators
        if self.hidden is not None:
            self.hidden = hidden_from_tensors(
                [h[:, self.rows].contiguous() for h in hidden_tensors(self.hidden)],
                self.config.model.cell,
            )
        saved = ck.tensors.get("dist.world_size")
        saved_n = int(saved.reshape(-1)[0]) if saved is not None else 1
        rank = self.ctx.rank
        if rank and f"rng.rank{rank}.cpu" in ck.tensors:
            torch.set_rng_state(ck.tensors[f"rng.rank{rank}.cpu"])
            if self.device.type == "cuda" and f"rng.rank{rank}.cuda" in ck.tensors:
                torch.cuda.set_rng_state(ck.tensors[f"rng.rank{rank}.cuda"], self.device)
        elif rank:
            torch.manual_seed(
                self.config.train.seed + RANK_SEED_STRIDE * rank + self.state.progress.step
            )
        if saved_n != self.ctx.world_size:
            self.log(
                f"note: resuming on {self.ctx.world_size} processes (the run used {saved_n}); the "
                "batches are the same, dropout's random masks are not"
            )


# ---------------------------------------------------------------------------------------- launching


def launch(nproc: int, args: list[str]) -> int:
    """Run ``charlstm train ARGS`` as `nproc` processes of this machine under torchrun's elastic
    agent, in this process; returns the job's exit status (130 after Ctrl-C, 143 after SIGTERM).

    The agent passes a Ctrl-C or SIGTERM on to every worker (they stop at the same step and save)
    and, when one worker fails, stops the others."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, available_cores() // nproc)))
    try:
        torchrun.main(
            ["--standalone", f"--nproc-per-node={nproc}", "-m", "charlstm", "train", *args]
        )
    except SignalException as exc:
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        print(
            f"charlstm: error: the process of rank {rank} {how} (its message, if any, is above); "
            "the job has ended",
            file=sys.stderr,
            flush=True,
        )
        return 128 - code if code < 0 else code or 1
    return 0
