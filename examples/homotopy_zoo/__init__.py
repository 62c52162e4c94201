"""The examples' reference models, dataset loaders and training loop (like TorchDEQ's
deq-zoo): everything the examples and benchmarks share that is not the library.

Installed with the project (``pip install -e ".[examples]"``, whose extra brings
torchvision, scikit-learn, tqdm and matplotlib); ``import torchdeq_homotopy`` never loads it.

* :mod:`homotopy_zoo.models`: the HomoODE paper's classifier layout (stem, cell, readout),
  with the state solved by a TorchDEQ core or integrated as a (augmented) Neural ODE;
* :mod:`homotopy_zoo.data`: embedded digits, Debian's Fashion-MNIST, torchvision sets;
* :mod:`homotopy_zoo.training`: the main job's training and comparison loop.
"""
