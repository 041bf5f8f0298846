"""ipywidgets front ends used by the notebooks (they need a Jupyter front end: JupyterLab or Notebook 7)."""
from .explorer import NeuronExplorer

__all__ = ["NeuronExplorer"]
