"""The served scoring model: MLflow "models from code" (``mlflow.pyfunc.log_model(python_model=<this file>)``).

Besides tracking.py the only module that imports mlflow: the served model must be an
``mlflow.pyfunc.PythonModel``, and MLflow runs this file to load it, in the serving process
(``mlflow models serve -m models:/ebm-mnist@champion``), with the pipeline's code shipped
inside the registered model. tracking.py logs and registers it; it never imports this file.

Request: ``POST /invocations`` ``{"inputs": [...]}``, N x 1 x 32 x 32 float32 in [-1, 1].
Answer: ``{"predictions": [{"score": s, "energy": -s}, ...]}``, one row per image, in order;
``score`` is what the pipeline computes (``pipeline.evaluate.score_images``) for the same images.
"""

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.model import IMAGE_SHAPE

ARTIFACT_KEY = "energy_model"  # the DVC model file inside the logged model


class EnergyScorer(mlflow.pyfunc.PythonModel):
    """Scores a batch of digits: per image ``score`` s(x) and ``energy`` -s(x), on the CPU."""

    def load_context(self, context):
        import torch

        from pipeline.stages.common import load_energy_model

        self.device = torch.device("cpu")
        self.model, _ = load_energy_model(context.artifacts[ARTIFACT_KEY], self.device)

    # model_input: the signature's float32 tensor arrives as an array (a hint MLflow infers no schema from:
    # the logged signature is the contract).
    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        import torch

        from pipeline.evaluate import score_images

        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
            raise MlflowException.invalid_parameter_value(
                f"inputs must be images of shape N x {' x '.join(map(str, IMAGE_SHAPE))}; got {images.shape}"
            )
        if images.size and not (np.isfinite(images).all() and images.min() >= -1.0 and images.max() <= 1.0):
            raise MlflowException.invalid_parameter_value(
                "inputs must be pixel values in [-1, 1] (the prepared data's scale: 2 * x / 255 - 1)"
            )
        scores = score_images(self.model, torch.from_numpy(np.ascontiguousarray(images)), self.device)
        return pd.DataFrame({"score": scores, "energy": -scores})


mlflow.models.set_model(EnergyScorer())
