"""`train.evaluators` on the live model: the tasks of `tools/evaluate.py`, their examples read once
at start-up, run at every validation and named `eval/<name>/<metric>` for the run's sinks.

Plans with one shard of the model (tp = pp = ep = 1, validated) split the examples over the
data-parallel ranks as `tools/evaluate.py` splits them over its ranks. Under ZeRO-3 every
forward gathers each layer's weights from all ranks, so there every rank runs every example:
the ranks then call the same layers in the same order, as the gathers need."""

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

from llmscale.config.plan import ParallelPlan
from llmscale.config.schema import EvaluatorConfig
from llmscale.data import Tokenizer
from llmscale.eval.model_source import LoadedModel, with_tokenizer
from llmscale.eval.ranks import Ranks
from llmscale.eval.tasks import PreparedTask, prepare_task, run_metrics, run_task
from llmscale.models import Llama


class TrainingEvaluators:
    def __init__(self, specs: List[EvaluatorConfig], model: Llama, tokenizer: Tokenizer,
                 plan: ParallelPlan, dp_rank: int, device: torch.device, run_dir: Path,
                 root: Path):
        """`model` is the module the engine trains (ZeRO-3's hooks gather its weights);
        relative paths start at `root`."""
        self.tasks: List[PreparedTask] = [
            prepare_task(spec, tokenizer, root, f"train.evaluators[{index}].data")
            for index, spec in enumerate(specs)]
        # Only with evaluators: a run without them reads nothing more.
        self.loaded: Optional[LoadedModel] = None
        if self.tasks:
            self.loaded = with_tokenizer(model, tokenizer, getattr(tokenizer, "path", None),
                                         run_dir)
        self.ranks = (Ranks(0, 1, device) if plan.zero_stage == 3
                      else Ranks(dp_rank, plan.dp, device))

    def __call__(self) -> Dict[str, Union[int, float]]:
        """Every evaluator's metrics, the same on every rank."""
        if not self.tasks:
            return {}
        model = self.loaded.model
        was_training = model.training
        model.eval()
        try:
            return {name: value for task in self.tasks for name, value in
                    run_metrics(task.name, run_task(task, self.loaded, self.ranks)["metrics"]
                                ).items()}
        finally:
            model.train(was_training)
