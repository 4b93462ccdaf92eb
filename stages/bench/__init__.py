"""The bench commands: each runs whole stages or their parts and prints the project's figure beside
a baseline measured in the same run (`search`, `fit`, `encode`, `cluster`, `quality`)."""
