"""The recipe of the embedded model (``prospect/toyworld/model``): its architecture, its tokenizer, the training
run that reproduces the shipped weights from scratch (``train``), and their measurement (``quality``)."""
