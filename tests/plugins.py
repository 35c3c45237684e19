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


@register(WaitConfig)
def wait(config: WaitConfig, ctx: StepContext) -> StepResult:
    started.append(time.monotonic())
    deadline = time.monotonic() + config.seconds
    while time.monotonic() < deadline:
        ctx.progress("waiting", 1 - (deadline - time.monotonic()) / config.seconds)
        time.sleep(0.05)
    return StepResult(ctx.model_path)
