"""Training with the paper's recipe (Sec. 3) on any ImageFolder, single process or under ``torchrun``.

Every piece of the recipe is a field of ``TrainConfig`` (defaults = the paper), plus the options that
make small-data training work (random-resized crops, weight decay, cosine/step schedules, warm-up,
label smoothing, Kaiming init). A run directory holds:

    checkpoint.pt        full state, rewritten atomically after every epoch (resume=True continues)
    metrics.jsonl        one JSON line per epoch: loss, top-1/top-5 (train and val), lr, time
    curves.png           the training curves
    snapshots/epoch-NNN.safetensors   weights at the chosen epochs (feature-evolution view)
    model.safetensors    the final weights, loadable by every command

Exact resumption: the data order and each sample's augmentation depend only on (seed, epoch, index),
and the RNG state used by dropout is saved with the checkpoint. A run may be resumed with other options
(more epochs, a per-layer weight decay): each change is recorded with the epoch it starts after
(``config_changes`` in the checkpoint and in the weights' metadata), and the momentum buffers follow
their parameters into the new parameter groups.

Weight decay is SGD's coupled L2 term: with momentum mu, a weight that no gradient drives shrinks by a
factor of about ``exp(-lr * wd / (1 - mu))`` per step. A short run on a small dataset (thousands of
steps, not the paper's ~450,000) therefore leaves much of the random initialisation in filters whose
gradients are weak, e.g. the high frequencies of layer-1 filters; ``layer_weight_decay`` (e.g.
``{"conv1": 0.005}``) lets those layers decay faster than the rest.

One job a module: ``config`` (``TrainConfig``, ``check_config``), ``recipe`` (parameter groups, the
learning-rate schedule, filter renormalisation, ``init_from_weights``), ``run`` (a run set up: process
group, data, network, optimizer), ``runfolder`` (the run folder; resuming from its checkpoint),
``loop`` (``train`` and the epoch), ``snapshots`` (the files each epoch writes), ``evaluation``
(``evaluate_model``, ``evaluate``). Every name below is importable from ``deconvnet.training``.
"""

from ..models import init_weights  # initialisation is the models'; kept importable from here
from ..runtime import resolve_device  # devices are the runtime's; kept importable from here
from .config import TrainConfig, check_config, min_input_size
from .evaluation import evaluate, evaluate_model, prepare_batch
from .loop import train
from .recipe import LRSchedule, init_from_weights, parameter_groups, renormalize_filters
from .runfolder import config_changes

__all__ = [
    "parameter_groups",
    "config_changes",
    "TrainConfig",
    "train",
    "evaluate",
    "renormalize_filters",
    "init_weights",
    "init_from_weights",
    "evaluate_model",
    "resolve_device",
    "prepare_batch",
    "LRSchedule",
    "check_config",
    "min_input_size",
]
