"""CLI: ``python -m train --config mnist_mlp --method srigl --sparsity 0.9 --steps 500 --workdir DIR``.

Exit status: 0 done (or already complete, or stopped by --stop-after), 2 usage error (a bad flag or value, or a
workdir whose run does not match the flags; one line, nothing written), 1 failure (missing/corrupt data, no
usable checkpoint, NaN/Inf), 130/143 interrupted by SIGINT/SIGTERM (checkpointed: the same command resumes).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import signal
import sys
import textwrap
import typing

from train.distributed import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_INIT_TIMEOUT, ENV_VARS, LaunchError, \
    parse_launch
from train.configs import CONFIGS, RULES, Config, ConfigError, allowed_text, field_kind, get_config, parse_field, \
    show_value

EPILOG = """\
Resuming: re-running a command continues its workdir from the newest intact checkpoint (a damaged one is
skipped with a warning and moved to WORKDIR/damaged-checkpoints/; nothing is deleted). A finished run is
reported as already complete and left untouched. Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes
a checkpoint and exits with 130/143; run the same command to resume.

Multi-process runs (see the launch flags below): SIGTERM to any one process makes every process stop at the
same step (JAX's preemption sync point), write the checkpoint together and exit 143. SIGINT to one process
aborts it without a checkpoint (Ctrl-C in a terminal reaches every local process of the group, which then all
abort); the others then exit non-zero within --heartbeat-timeout seconds. A process killed outright has the
same effect. Re-launching all processes resumes from the last complete checkpoint.

Changing a schedule field on resume (--steps/--epochs, --lr, --lr-schedule, --lr-decay-epochs,
--lr-decay-factor, --warmup-epochs, --delta-t, --t-end-frac, --alpha) is an error unless --extend is given.
Fields that define the network, data or optimizer state (model, dataset, batch size, method, sparsity, seed,
...) never change on resume. Others (--eval-every, --log-every, --ckpt-every, --progress, --stop-after, ...)
may change freely.

Exit status: 0 done, 2 usage error (nothing written), 1 data/checkpoint/NaN failure, 130/143 interrupted.
"""

EXTEND_HELP = ("continue a workdir's run under changed schedule fields (e.g. a larger --steps): training "
               "goes on from its checkpoint to the new total, with the learning-rate schedule and the "
               "mask-update end t_end recomputed for the new config as if it had been the config from the start "
               "(optimizer state, masks and data position carry over; the lr may jump at the resume point). "
               "Without --extend such a change is an error.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage of ~50 flags would bury the message)."""

    def error(self, message: str) -> typing.NoReturn:
        # 'argument --steps/--steps_x: --steps abc is invalid...' -> '--steps abc is invalid...'
        message = re.sub(r"^argument [^:]+: (?=--)", "", message)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _field_type(name: str) -> typing.Callable[[str], typing.Any]:
    def convert(text: str):
        try:
            value = parse_field(name, text)
            rule = RULES[name]
            if value is not None and ((rule.choices and value not in rule.choices) or
                                      (rule.check is not None and not rule.check(value))):
                raise ConfigError(name, text, allowed_text(name))
            return value
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = name  # argparse names the type in some messages
    return convert


def build_parser(preset: str = "mnist_mlp") -> argparse.ArgumentParser:
    """The CLI; --help shows the defaults of ``preset`` (the --config given, else mnist_mlp)."""
    base = CONFIGS.get(preset, CONFIGS["mnist_mlp"])
    parser = _Parser(
        prog="python -m train", allow_abbrev=False, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Train a sparse network with SRigL / RigL / SET / static / dense. Every --field overrides that field "
            "of the chosen --config preset (train/configs.py); 'none' unsets an optional field. Defaults shown "
            f"are those of --config {base.name}.", 110))
    parser.add_argument("--config", default="mnist_mlp", type=_config_name, metavar="NAME",
                        help=f"recipe preset: {' | '.join(CONFIGS)} (default: mnist_mlp)")
    parser.add_argument("--extend", action="store_true", default=argparse.SUPPRESS, help=EXTEND_HELP)
    for field in dataclasses.fields(Config):
        if field.name == "name":
            continue
        flag = "--" + field.name.replace("_", "-")
        kind, _ = field_kind(field)
        rule = RULES[field.name]
        help_text = (f"{rule.help}. Allowed: {allowed_text(field.name)}. "
                     f"Default: {show_value(getattr(base, field.name))}").replace("%", "%%")
        common = dict(dest=field.name, default=argparse.SUPPRESS, type=_field_type(field.name),
                      metavar="|".join(rule.choices) if rule.choices else kind.upper())
        parser.add_argument(flag, help=help_text, **common)
        if "_" in field.name:  # --delta_t works too (not listed in --help)
            parser.add_argument("--" + field.name, help=argparse.SUPPRESS, **common)
    launch = parser.add_argument_group(
        "multi-process launch (launch settings, not run settings: a run resumes under any launch)",
        "One process per host (or per GPU), all started with the same flags except --process-id; each loads "
        "only its share of every global batch, process 0 writes the run's files. Each flag may instead come from "
        "its environment variable (a flag wins), so a cluster launcher can set them.")
    launch.add_argument("--num-processes", dest="num_processes", default=argparse.SUPPRESS, metavar="N|auto",
                        help="number of processes ($JAX_NUM_PROCESSES); auto: jax.distributed.initialize() "
                             "with cluster auto-detection (TPU, SLURM, Open MPI). Default: one process")
    launch.add_argument("--process-id", dest="process_id", default=argparse.SUPPRESS, metavar="I",
                        help="this process's index in [0, N) ($JAX_PROCESS_ID)")
    launch.add_argument("--coordinator", dest="coordinator", default=argparse.SUPPRESS, metavar="HOST:PORT",
                        help="address of process 0's coordination service, reachable by all processes "
                             "($JAX_COORDINATOR_ADDRESS)")
    launch.add_argument("--init-timeout", dest="init_timeout", default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"how long processes wait for each other at start-up ($SRIGL_INIT_TIMEOUT). "
                             f"Default: {DEFAULT_INIT_TIMEOUT}")
    launch.add_argument("--heartbeat-timeout", dest="heartbeat_timeout", default=argparse.SUPPRESS,
                        metavar="SECONDS",
                        help=f"a process silent this long is declared lost and every other process exits "
                             f"non-zero (a watchdog names it after 0.4 x this; $SRIGL_HEARTBEAT_TIMEOUT). "
                             f"Default: {DEFAULT_HEARTBEAT_TIMEOUT}")
    return parser


def _config_name(text: str) -> str:
    if text not in CONFIGS:
        raise argparse.ArgumentTypeError(str(ConfigError("config", text, " | ".join(CONFIGS))))
    return text


def _preset_in(argv: typing.Sequence[str]) -> str:
    """The --config of argv (for the defaults --help shows), without failing on anything else."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="mnist_mlp")
    known, _ = pre.parse_known_args(argv)
    return known.config


def main(argv: typing.Sequence[str] | None = None) -> int:
    code = _main(argv)
    if code and "jax" in sys.modules:
        from train import distributed
        if distributed.process_count() > 1:
            # Skip jax.distributed's shutdown barrier (it would wait for the other processes, which are stuck in
            # a collective with this one): exit now; the others see its heartbeats stop and exit too.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _main(argv: typing.Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_preset_in(argv))
    args = vars(parser.parse_args(argv))
    name, extend = args.pop("config"), args.pop("extend", False)
    launch_flags = {k: args.pop(k, None) for k in ENV_VARS}
    try:
        launch = parse_launch(launch_flags)
    except LaunchError as e:
        parser.error(str(e))
    try:
        cfg = get_config(name, **args)
    except ConfigError as e:
        parser.error(str(e))

    try:  # jax and the model code load here (seconds): Ctrl-C now is no traceback either
        from train.checkpoint import CheckpointError, IncompatibleRunError
        from train.data import DataError
        from train.loop import NonFiniteError, SetupError, train
        from train.report import summary_text
        from train import distributed
        distributed.initialize(launch)
        distributed.start_watchdog(launch)
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted before training started; nothing was written.", file=sys.stderr)
        return 128 + signal.SIGINT

    command = " ".join(["python -m train"] + [shlex.quote(a) for a in argv])
    try:
        result = train(cfg, extend=extend)
    except ConfigError as e:
        parser.error(str(e))
    except (IncompatibleRunError, SetupError) as e:
        parser.error(str(e))
    except (DataError, CheckpointError, NonFiniteError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{parser.prog}: interrupted; checkpoints written so far are kept (run the same command to "
              f"resume).", file=sys.stderr)
        return 128 + signal.SIGINT

    distributed.stop_watchdog()  # finished normally (the others may still be writing): silence is expected now
    s = result.summary
    if not distributed.is_primary():  # process 0 reports for the run
        return 128 + result.signal if result.status == "interrupted" else 0
    if result.status == "interrupted":
        print(f"\ninterrupted by {s['interrupted']} at step {s['steps']} of {s['total_steps']}; checkpoint "
              f"written to {result.checkpoint}. Resume with:\n  {command}", file=sys.stderr)
        return 128 + result.signal
    if result.status == "already_complete":
        print(f"already complete: {s['workdir']} finished all {s['steps']} steps; nothing was changed (stored "
              f"summary below; to train longer, pass a larger --steps with --extend).")
    print("\n" + summary_text(s))
    if result.status == "stopped":
        print(f"\nstopped at step {s['steps']} of {s['total_steps']} (checkpointed); run the same command "
              f"without --stop-after to resume.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
