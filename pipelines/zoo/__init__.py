"""The reference zoo: small trained DiT / MMDiT models, their procedural dataset and an offline evaluator.

    from dit_accel.pipelines import zoo
    images, labels = zoo.dataset(500, seed=0)           # (500, 3, 32, 32) in [0, 1], balanced labels
    pipe = zoo.load("dit")                               # or "mmdit"; safetensors shipped in the package
    out = pipe(class_labels=[3, 7], output_type="pt").images
    score = zoo.evaluator().class_consistency(out, [3, 7])
"""

from dit_accel.pipelines.zoo.evaluator import Evaluator, evaluator
from dit_accel.pipelines.zoo.pipelines import ZooDiTPipeline, ZooFlowDiTPipeline, ZooMMDiTPipeline, load
from dit_accel.pipelines.zoo.shapes import CLASS_NAMES, NUM_CLASSES, dataset

MODELS = ("dit", "mmdit", "flowdit")
# Never used to choose a default (ditaccel tune refuses it): defaults are chosen on dit and mmdit, and reported here.
EVALUATION_ONLY = ("flowdit",)

__all__ = [
    "CLASS_NAMES",
    "MODELS",
    "NUM_CLASSES",
    "Evaluator",
    "EVALUATION_ONLY",
    "ZooDiTPipeline",
    "ZooFlowDiTPipeline",
    "ZooMMDiTPipeline",
    "dataset",
    "evaluator",
    "load",
]
