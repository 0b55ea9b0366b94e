"""Every torchvision classification builder up to 150 M parameters (random weights, non-trivial batch-norm
statistics) projects its logits' strongest unit (every op of the model below it) under each rule and
equals the independent reference (``tests/reference.py``: autograd through the unmodified model, each
activation's backward replaced by the rule's, gates, 1/sigma and attention weights detached), to 1e-5 of
the reference's largest magnitude (float32 sums in a different order). A refusal must be one line, and
is a failure: the zoo is covered. Inputs are as small as each model allows (64 px; ViT built for 64 px;
Inception 80 px; MaxViT and the Swin V2 windows at their sizes).

Marked ``slow``: the walk builds some 75 models (a few minutes on a 2-core CPU); ``make test`` runs it.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from deconvnet.engine import RULES, DeconvNet, Selection
from deconvnet.errors import DeconvnetError
from tests.helpers.models import randomize_batchnorm
from tests.reference import reference_projection

MAX_PARAMS = 150_000_000
# the smallest input each family takes (default 64)
SIZES = {"inception_v3": 80, "maxvit_t": 224, "swin_v2_t": 64, "swin_v2_s": 64, "swin_v2_b": 64}
# relative to the reference's largest magnitude: float32 sums over up to ~10^5 terms in another order
TOLERANCE = 1e-5


def _builders() -> list[str]:
    names = []
    for name in torchvision.models.list_models(module=torchvision.models):
        params = torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]
        if params <= MAX_PARAMS:
            names.append(name)
    return names


BUILDERS = _builders()


def test_the_walk_covers_the_zoo():
    # today's families are all there (a torchvision that renamed them would silently shrink the walk)
    for name in (
        "mobilenet_v3_large",
        "efficientnet_b0",
        "regnet_y_400mf",
        "convnext_tiny",
        "swin_t",
        "vit_b_16",
        "maxvit_t",
        "swin_v2_t",
    ):
        assert name in BUILDERS
    assert len(BUILDERS) >= 70


def _model(name: str, size: int) -> torch.nn.Module:
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    if name in ("googlenet", "inception_v3"):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs).eval()
    randomize_batchnorm(model)
    if name.startswith("vit_"):  # torchvision zeroes ViT's head: the logits would not depend on the image
        with torch.no_grad():
            model.heads.head.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILDERS)
def test_every_builder_projects_under_every_rule_and_equals_the_reference(name):
    size = SIZES.get(name, 64)
    model = _model(name, size)
    image = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    engine = DeconvNet(model)
    assert engine.graph.output_name is not None, name
    logits = engine.graph.by_name[engine.graph.output_name].qualname
    with torch.no_grad():
        unit = int(model(image)[0].argmax())  # the strongest logit
    refs = {}
    for rule in RULES:
        try:
            (p,) = engine.project(image, [Selection(0, logits, unit)], rule=rule)
        except DeconvnetError as e:
            assert "\n" not in str(e), (name, rule, str(e))
            pytest.fail(f"{name} refused under {rule}: {e}")  # the zoo is covered: no refusal expected
        assert p.image.shape == (3, size, size)
        refs[rule] = reference_projection(model, image, model, unit, None, rule)  # the model's output: its logits
        scale = float(refs[rule].abs().max())
        assert scale > 0, (name, rule, "degenerate reference")
        assert float((p.image - refs[rule]).abs().max()) <= TOLERANCE * scale, (name, rule)
    # the rules differ (a rule silently taking another's way would pass above)
    assert not torch.allclose(refs["deconvnet"], refs["gradient"], rtol=1e-3, atol=1e-3 * scale), name
