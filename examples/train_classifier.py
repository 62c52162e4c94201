"""Train and compare HomoODE, DEQ, Neural ODE and Augmented Neural ODE image classifiers.

All models share one stem, cell and readout (homotopy_zoo.models); only the way the
cell's state is produced differs. With no arguments it trains all four on scikit-learn's
digits (embedded, no network) and prints a comparison table.

    python examples/train_classifier.py
    python examples/train_classifier.py --dataset fashion-mnist --model homoode deq --epochs 5
    python examples/train_classifier.py --model deq --f_solver homotopy --f_max_iter 60
    torchrun --nproc_per_node 2 examples/train_classifier.py --model homoode

Each run writes OUT/<model>/results.json (accuracy, parameters, memory, NFE,
images/s, wall time, config), OUT/<model>/checkpoint.pt (``--resume`` continues from it),
and OUT/training_curves.png and OUT/accuracy_vs_memory.png.
"""
from homotopy_zoo.training import main

if __name__ == "__main__":
    main()
