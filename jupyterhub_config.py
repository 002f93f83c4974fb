"""msr's JupyterHub (`make hub`): accounts, and the dashboard as the hub's one service. All of it is msr.hub.configure
(nbs/18_hub.ipynb), with the settings in params.yaml's hub section."""
from msr.hub import configure

configure(c)  # noqa: F821 (JupyterHub hands this file its config object `c`)
