"""A test-only step type, loaded through MODELPRESS_PLUGINS like any plug-in technique: it reports
progress for a while and returns its input. It stands in for a long technique (training) so the
tests can cancel it, overrun the time limit, or kill its worker mid-step."""

import time

from modelpress.spec.configs import StepConfig, register_config
from worker.engine.registry import StepContext, StepResult, register

started: list[float] = []


@register_config("wait")
class WaitConfig(StepConfig):
    seconds: float = 30.0
    # Quiet: no progress until the end, like a long library call that never checks in; a cancel
    # is then settled by the job's heartbeat, not by the step.
    quiet: bool = False


@register(WaitConfig)
def wait(config: WaitConfig, ctx: StepContext) -> StepResult:
    started.append(time.monotonic())
    deadline = time.monotonic() + config.seconds
    if config.quiet:
        time.sleep(config.seconds)
    while time.monotonic() < deadline:
        ctx.progress("waiting", 1 - (deadline - time.monotonic()) / config.seconds)
        time.sleep(0.05)
    ctx.progress("waiting", 1.0)
    return StepResult(ctx.model_path)
