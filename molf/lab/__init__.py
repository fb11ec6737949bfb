"""molf.lab: everything around the core that the notebooks and experiments use.

It imports the core (``molf``); the core never imports it. Its modules:

Training
    engine       the one training loop, ``fit(model, optimizer, batches, ...)``, with callbacks
    train        the runner: ``run(TrainConfig(...))`` for every method, its run directories and command line
    models       the embedded SmolLM2-135M and a tiny random Llama
    tasks        the tasks (a package: one module per family, the registry, the SQL sandbox)
    regime       the regime map: a controlled setting where LoRA or FFT wins, every method on it

Reading and drawing runs
    runs         run directories read back (validated) into pandas
    analysis     tables of routing, gradients and losses; plots draws them
    stats        paired bootstrap intervals and tests over seeds and items
    retention    the general-knowledge probe scored after fine-tuning
    heuristics   model-free rules each task is compared with

Looking inside
    explorer     the router explorer (scrub a run, or watch one train live)
    html_app     the router explorer as one self-contained HTML file (no kernel)
    teaching     why an expert wins: every score in its factors, and a classroom app
    shadow       shadow routers: what other rules would have picked, and what that would have cost
    router_report  the figures and tables of notebook 08 (shadow routers and weight updates per method)
    weights      what the updates did to the weights (spectra, intruder dimensions, update audit)
    importer     the reference implementation's routing log as a run directory
    tensorboard  routing statistics as TensorBoard events

Notebooks
    notebook     the helpers the notebooks share
    suite        the papermill runner of the notebook suite
    regression   the golden numbers of the suite's regression mode
    paths        where the package finds its data and notebooks
"""
