"""raydpo: Direct Preference Optimization as a pipeline of Ray stages.

Importing this package is cheap: it pulls in neither Ray Train nor vLLM. Stage modules import their
heavy dependencies where they run.
"""

__version__ = "0.1.0"
