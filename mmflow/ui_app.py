"""The MLflow server app that ``mmflow ui`` runs: MLflow's own, plus one page of mmflow's.

MLflow 3.17's UI keeps its sidebar's GenAI / Model training choice in the browser's local
storage (key ``mlflow.workflowType_v1``; GenAI when unset) and drops the URL's ``workflowType``
from its own links, so in a browser that never chose, a run page opened from the runs table
shows GenAI's sidebar and an "Evaluations" breadcrumb. Only a page of the UI's own origin can
write that storage: ``/mmflow/open?to=ROUTE`` chooses Model training when the browser has no
choice yet (a choice it has stays) and goes on to ``#ROUTE``. MLflow loads this module as the
server app named ``mmflow`` (entry point group ``mlflow.app``): ``mlflow ui --app-name mmflow``.
"""

from __future__ import annotations

import json
import re

STORAGE_KEY = "mlflow.workflowType_v1"  # MLflow's useLocalStorage: f"{key}_v{version}"
MODEL_TRAINING = "machine_learning"
OPEN_PATH = "/mmflow/open"
_ROUTE = re.compile(r"/experiments(/[0-9]+(/runs)?)?(\?[A-Za-z0-9_=&-]*)?")  # nothing else

_PAGE = """<!doctype html><meta charset="utf-8"><title>MLflow</title><script>
if (localStorage.getItem({key}) === null) localStorage.setItem({key}, {value});
location.replace("../#" + {route});
</script>"""


def open_page(route: str) -> tuple[str, int]:
    """The page that chooses the model-training view and goes on to ``route``; 400 for a route
    that is not an experiment's page (no open redirect, nothing unescaped in the script)."""
    if not _ROUTE.fullmatch(route):
        return f"mmflow: not an experiment route: {route!r}\n", 400
    quoted = {k: json.dumps(v) for k, v in
              (("key", STORAGE_KEY), ("value", json.dumps(MODEL_TRAINING)), ("route", route))}  # fmt: skip
    return _PAGE.format(**quoted), 200


def create_app():
    """MLflow's server app with ``/mmflow/open``: Flask's for gunicorn and waitress, FastAPI
    around it for uvicorn (MLflow's default), as MLflow's own basic-auth app does."""
    from flask import request
    from mlflow.environment_variables import _MLFLOW_SGI_NAME
    from mlflow.server import app

    def _open():
        body, status = open_page(request.args.get("to", "/experiments"))
        kind = "text/html" if status == 200 else "text/plain"
        return body, status, {"Content-Type": f"{kind}; charset=utf-8", "Cache-Control": "no-store"}

    if "mmflow_open" not in app.view_functions:
        app.add_url_rule(OPEN_PATH, "mmflow_open", _open)
    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(app)
    return app
