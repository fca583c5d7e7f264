"""One exact distributed step as plain numpy objects: what a worker and a server hold and do.
The Ray actors (distributed/actors.py) are thin shells over these; tests call them directly."""
