"""The pyfunc colorizer as MLflow's "models from code": `log_colorizer` logs this file, not a pickled object.

MLflow copies the file into the logged model and runs it at load time, so loading a model runs chromalab's
code as installed, never a pickle's (MLflow warns at every pickled `python_model`).
"""

import mlflow

from chromalab.serve.pyfunc import Colorizer

mlflow.models.set_model(Colorizer())
