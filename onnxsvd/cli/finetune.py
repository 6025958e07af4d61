"""``onnxsvd finetune``: parse → :class:`FinetuneConfig` → :func:`finetune_file` → summary (and JSON).

torch is imported only when the
command runs, so the rest of the CLI works without it. Errors are :class:`onnxsvd.errors.OnnxSvdError`
for ``onnxsvd.cli.main`` to print as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

from onnxsvd.cli.options import CommaList
from onnxsvd.cli.render import progress_bar, stdout
from onnxsvd.errors import UsageError
from onnxsvd.finetune.config import DEVICES, SCHEDULES, TRAIN_FORMS, FinetuneConfig

if TYPE_CHECKING:
    from onnxsvd.finetune.report import FinetuneReport

__all__ = ["finetune_command", "render_report"]

_DEFAULTS = FinetuneConfig()


@click.command("finetune")
@click.argument("rewritten", type=click.Path(path_type=Path))
@click.option("--teacher", required=True, type=click.Path(path_type=Path),
              help="The original model REWRITTEN was made from: its outputs are the targets.")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path),
              help="Training data: an .npz keyed by input name (axis 0 = samples), or a folder of them; "
                   "--val-split of it is held out.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Where to write the model.")
@click.option("--train", type=click.Choice(TRAIN_FORMS), default=_DEFAULTS.train, show_default=True,
              help="factors: both factors of every site; core: U_r (diag Σ + X·Y) V_rᵀ with U_r, V_r fixed.")
@click.option("--steps", type=int, default=_DEFAULTS.steps, show_default=True,
              help="Optimisation steps at most (at least 1).")
@click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True,
              help="Adam step size relative to each trained tensor's RMS (1e-3: about 0.1% of its size a step).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_DEFAULTS.schedule, show_default=True,
              help="Learning rate after the warm-up: cosine decay to a tenth of --lr at --steps, or constant.")
@click.option("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps, show_default=True,
              help="Steps of linear warm-up to --lr.")
@click.option("--lora-rank", type=int, default=_DEFAULTS.lora_rank, show_default=True,
              help="Rank R of the core's update X·Y (--train core).")
@click.option("--val-split", type=float, default=_DEFAULTS.val_split, show_default=True,
              help="Fraction of the samples held out for early stopping and the best checkpoint.")
@click.option("--batch-size", type=int, default=_DEFAULTS.batch_size, show_default=True, help="Samples per step.")
@click.option("--eval-every", type=int, default=_DEFAULTS.eval_every, show_default=True,
              help="Steps between held-out evaluations.")
@click.option("--patience", type=int, default=_DEFAULTS.patience, show_default=True,
              help="Held-out evaluations without improvement before stopping.")
@click.option("--augment", type=float, default=_DEFAULTS.augment, show_default=True,
              help="Probability of replacing each real token by a random one of the data in a training batch "
                   "(token models with an attention mask); the teacher labels each such batch afresh.")
@click.option("--outputs", "outputs", type=CommaList(str, example="sentence_embedding,logits"), metavar="NAMES",
              help="Outputs to distil, comma-separated (for example the pooled embedding a deployment reads) "
                   "[default: every float output of both models].")
@click.option("--match-activations/--no-match-activations", default=_DEFAULTS.match_activations,
              show_default=True,
              help="Also distil every site's output (the teacher runs in torch on each batch): about twice the "
                   "time of a step, better at equal time.")
@click.option("--activation-weight", type=float, default=_DEFAULTS.activation_weight, show_default=True,
              help="Weight of the matched activations' term against the outputs' term (--match-activations).")
@click.option("--relation-weight", type=float, default=_DEFAULTS.relation_weight, show_default=True,
              help="Weight of a term that distils the cosine similarities between the samples of a batch, for "
                   "every output without a sequence axis (a pooled embedding): what nearest-neighbour search "
                   "sees. 0 turns it off.")
@click.option("--device", type=click.Choice(DEVICES), default=_DEFAULTS.device, show_default=True,
              help="Where torch trains.")
@click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True,
              help="Seeds the split, the batch order and the core's initialisation.")
@click.option("--threads", type=int, help="torch and onnxruntime CPU threads [default: theirs].")
@click.option("--allow-other-teacher", is_flag=True,
              help="Distil from a teacher other than the model REWRITTEN was made from (its fingerprint differs "
                   "from the one rewrite recorded), on purpose; its inputs and outputs must still match.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--force", is_flag=True, help="Allow -o to overwrite an input model.")
@click.pass_context
def finetune_command(
    context: click.Context,
    rewritten: Path,
    teacher: Path,
    data_path: Path,
    output: Path,
    train: str,
    steps: int,
    lr: float,
    schedule: str,
    warmup_steps: int,
    lora_rank: int,
    val_split: float,
    batch_size: int,
    eval_every: int,
    patience: int,
    augment: float,
    outputs: tuple[str, ...] | None,
    match_activations: bool,
    activation_weight: float,
    relation_weight: float,
    device: str,
    seed: int,
    threads: int | None,
    allow_other_teacher: bool,
    report_path: Path | None,
    force: bool,
) -> None:
    """Fine-tune the factors of REWRITTEN (from 'onnxsvd rewrite') to reproduce the teacher's outputs.

    The result keeps REWRITTEN's graph: same nodes, shapes, size and speed. It is never worse than
    REWRITTEN on the held-out split (the best checkpoint is kept; REWRITTEN itself if nothing beats it).
    """
    from onnxsvd import io
    from onnxsvd.finetune.train import finetune_file

    config = FinetuneConfig(
        train=train, steps=steps, lr=lr, schedule=schedule, warmup_steps=warmup_steps, lora_rank=lora_rank,
        val_split=val_split, batch_size=batch_size, eval_every=eval_every, patience=patience, augment=augment,
        outputs=outputs or (),
        match_activations=match_activations, activation_weight=activation_weight,
        relation_weight=relation_weight, device=device, seed=seed, threads=threads,
        allow_other_teacher=allow_other_teacher,
    )
    _refuse_ignored_options(context, config)
    if report_path is not None:
        io.check_outputs(
            {"-o": output, "--report": report_path},
            {"rewritten": rewritten, "--teacher": teacher, "--data": data_path},
            forceable=("-o=rewritten", "-o=--teacher"),
            force=force,
        )
        io.check_output_path(report_path, None, force=False)
    with progress_bar("fine-tuning", total=steps or None, train="-", heldout="-") as bar:

        def update(step: int, total: int, train_loss: float, heldout_loss: float) -> None:
            bar(step, total, train=f"{train_loss:.4g}", heldout=f"{heldout_loss:.4g}")

        report = finetune_file(rewritten, teacher, data_path, output, config, force=force, progress=update)
    if report_path is not None:
        report.write_json(report_path)
    render_report(report, stdout)
    stdout.print(f"wrote {output}")
    if report_path is not None:
        stdout.print(f"report: {report_path}")


def _refuse_ignored_options(context: click.Context, config: FinetuneConfig) -> None:
    """An option given on the command line that the configuration would not use is an error, not a no-op."""

    def given(name: str) -> bool:
        return context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    if given("lora_rank") and config.train != "core":
        raise UsageError(f"--lora-rank applies to --train core only (this run trains '{config.train}'); drop it")
    if given("activation_weight") and not config.match_activations:
        raise UsageError("--activation-weight weighs the matched activations; drop it or drop --no-match-activations")


def render_report(report: FinetuneReport, console: Console) -> None:
    """A short summary: what was trained, the held-out loss before and after, steps and time."""
    console.print(
        f"trained {report.pairs} factor pairs ({len(report.sites)} sites) as '{report.train}': "
        f"{report.trainable_parameters:,} parameters, {report.train_samples} training / "
        f"{report.heldout_samples} held-out samples, outputs {', '.join(report.outputs)}"
        + (f", {len(report.matched_activations)} matched activations" if report.matched_activations else "")
    )
    stop = "stopped early" if report.stopped_early else "ran to the end"
    console.print(
        f"held-out loss: {report.heldout_before:.5g} → {report.heldout_after:.5g} "
        f"({report.improvement:.1%} lower); best step {report.best_step} of {report.steps_run} ({stop})"
    )
    console.print(
        f"time: teacher {report.teacher_seconds:.1f} s, training {report.train_seconds:.1f} s on {report.device}"
    )
    for site, reason in report.skipped.items():
        console.print(f"not trained: {site}: {reason}")
    for note in report.notes:
        console.print(f"note: {note}")
