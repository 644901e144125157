import os

import torch

# Triton kernels run under the interpreter on CPU tensors where no GPU is present. This must be
# set before anything imports triton (torch._inductor does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# Each example of a kernel property test costs milliseconds; a compile costs seconds. The CI
# profile is derandomized so a red CI run reproduces locally; "dev" explores more.
settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=300, deadline=None)
# Triage: the CI examples without shrinking (a failure is reported at once, unminimised).
settings.register_profile("triage", parent=settings.get_profile("ci"),
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
