"""``FinetuneConfig``: every option of ``onnxsvd finetune`` and its default, validated on construction."""

from __future__ import annotations

import dataclasses

from onnxsvd.errors import UsageError

__all__ = ["DEVICES", "SCHEDULES", "TRAIN_FORMS", "FinetuneConfig"]

#: The ``--train`` choices (see :mod:`onnxsvd.finetune.forms`) and the ``--device`` choices.
TRAIN_FORMS = ("core", "factors")
DEVICES = ("cpu", "cuda")
SCHEDULES = ("cosine", "constant")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune a rewritten model against its original.

    Attributes:
        train: ``"factors"`` (both factors of every site trained) or ``"core"`` (``U_r``, ``V_r`` fixed,
            ``diag(σ) + X·Y`` trained).
        steps: optimisation steps at most (one batch each).
        lr: Adam's step size relative to each trained tensor's scale (its RMS at the start): 1e-3 moves
            every tensor by about 0.1% of its size per step, whatever the factors' absolute scale. The
            default, 3e-3, is what the MiniLM-L6 benchmark trains whole factors with.
        schedule: ``"cosine"`` (decay to a tenth of ``lr`` at ``steps``) or ``"constant"``.
        warmup_steps: steps of linear warm-up from near zero to ``lr``.
        lora_rank: R, the rank of the core's update ``X·Y`` (``core`` only).
        batch_size: samples per step.
        eval_batch_size: samples per batch when computing the teacher's outputs and the held-out loss.
        val_split: fraction of the samples held out for early stopping and for choosing the checkpoint.
        eval_every: steps between two held-out evaluations.
        patience: held-out evaluations without improvement before stopping.
        min_delta: relative improvement of the held-out loss that counts as one.
        augment: with a token mask, the probability of replacing each real token of the integer sequence
            inputs by a random token of the data for a training step; the teacher labels each such batch
            afresh (ONNX Runtime), so the student sees new inputs every epoch. 0 turns it off.
        outputs: the model outputs to distil, by name; empty: every float output both models have. Naming
            only the outputs a deployment reads (a pooled embedding, say) spends the factors' capacity on
            them alone.
        match_activations: also distil the site outputs (same tensor names in both models), with the teacher
            run in torch on each batch. About twice the time of a step, and better at equal time: on MiniLM-L6
            at 50% it reached a lower held-out loss of the outputs in 1,500 steps than the outputs alone did
            in 3,000, and more nearest-neighbour agreement. On by default.
        activation_weight: weight of the activation term against the outputs' term.
        relation_weight: weight of a relational term for every output without a sequence axis (a pooled
            embedding, logits): the squared difference between the student's and the teacher's cosine
            similarity matrices over each batch, relative to the variance of the teacher's similarities.
            It distils which samples lie near which (what nearest-neighbour search sees), where the
            outputs' term distils each sample alone. 0 turns it off.
        trim_padding: with a token-mask input (``attention_mask``…), cut each batch's trailing columns
            where every sample is padding, and leave padded positions out of the loss.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seeds the split, the batch order and the core's random ``X``.
        threads: torch CPU threads (``None``: torch's default).
        allow_other_teacher: distil from a teacher other than the model the rewritten one was made from
            (its fingerprint differs from the one ``rewrite`` recorded): a re-exported or retrained original,
            say. Its inputs and outputs must still match the rewritten model's.
    """

    train: str = "factors"
    steps: int = 300
    lr: float = 3e-3
    schedule: str = "cosine"
    warmup_steps: int = 10
    lora_rank: int = 8
    batch_size: int = 32
    eval_batch_size: int = 64
    val_split: float = 0.1
    eval_every: int = 25
    patience: int = 4
    min_delta: float = 1e-3
    augment: float = 0.0
    outputs: tuple[str, ...] = ()
    match_activations: bool = True
    activation_weight: float = 1.0
    relation_weight: float = 0.0
    trim_padding: bool = True
    device: str = "cpu"
    seed: int = 0
    threads: int | None = None
    allow_other_teacher: bool = False

    def __post_init__(self) -> None:
        if self.train not in TRAIN_FORMS:
            raise UsageError(f"unknown --train {self.train!r}; use one of {', '.join(TRAIN_FORMS)}")
        if self.device not in DEVICES:
            raise UsageError(f"unknown --device {self.device!r}; use one of {', '.join(DEVICES)}")
        if self.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {self.steps}: fine-tuning takes at least one step")
        if not self.lr > 0.0:
            raise UsageError(f"--lr must be > 0, got {self.lr:g}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown --schedule {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0:
            raise UsageError(f"--warmup-steps must be ≥ 0, got {self.warmup_steps}")
        if self.lora_rank < 1:
            raise UsageError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        for flag, value in (("--batch-size", self.batch_size), ("--eval-batch-size", self.eval_batch_size),
                            ("--eval-every", self.eval_every), ("--patience", self.patience)):
            if value < 1:
                raise UsageError(f"{flag} must be at least 1, got {value}")
        if not 0.0 < self.val_split < 1.0:
            raise UsageError(f"--val-split must be in (0, 1), got {self.val_split:g}")
        if not 0.0 <= self.augment < 1.0:
            raise UsageError(f"--augment must be in [0, 1), got {self.augment:g}")
        if self.min_delta < 0.0:
            raise UsageError(f"--min-delta must be ≥ 0, got {self.min_delta:g}")
        if self.activation_weight < 0.0:
            raise UsageError(f"--activation-weight must be ≥ 0, got {self.activation_weight:g}")
        if self.relation_weight < 0.0:
            raise UsageError(f"--relation-weight must be ≥ 0, got {self.relation_weight:g}")
        if any(not name for name in self.outputs):
            raise UsageError("--outputs takes output names separated by commas, with none empty")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {self.threads}")
