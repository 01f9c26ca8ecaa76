"""Fine-tuning tasks of the harness (``asgo-finetune``): GLUE sequence classification/regression
with any ``AutoModelForSequenceClassification``, and multiple-choice tasks (WinoGrande, BoolQ) for
causal LMs scored by the options' log-likelihoods. See :mod:`asgo.harness.finetune.train`."""

from asgo.harness.finetune.scores import accuracy, f1, matthews_correlation, pearson, spearman
from asgo.harness.finetune.tasks import GLUE_TASKS, MC_TASKS

__all__ = ["GLUE_TASKS", "MC_TASKS", "accuracy", "f1", "matthews_correlation", "pearson", "spearman"]
