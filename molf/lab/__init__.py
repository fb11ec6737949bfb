"""molf.lab: everything around the core that the notebooks and experiments use.

models (the embedded SmolLM2-135M and a tiny random Llama), tasks (data and metrics), train (the
single-run runner and its command line), runs (reading run directories), plots and analysis (tables and
figures of routing, gradients and losses), explorer (the interactive router explorer) and suite (the
papermill runner). It imports the core (``molf``); the core never imports it.
"""
