"""MLflow models-from-code entry point: the pyfunc wrapper of a fitted forecaster.

:func:`models.pyfunc.log_forecaster` logs this file as the model's code (MLflow 3's recommended form, no
cloudpickled Python object); the fitted forecaster travels as its own pickle artifact and the default
horizon as ``model_config``.
"""

from mlflow.models import set_model

from models.pyfunc import ForecasterPyfunc

set_model(ForecasterPyfunc())
