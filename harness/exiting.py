"""How a process of the harness exits: without Python's final garbage collection.

At exit, after the atexit handlers, Python's finalization runs the cyclic garbage collector over
every object the process still holds (torch's, transformers', MLflow's): 1.7 s of a 10 s plan on
a 2-core machine. Nothing of the harness waits for a collection to be written out (files are
closed and runs ended before exit; temporary folders go by atexit handlers), so the last atexit
handler takes every object out of the collector's view. multiprocessing's children (the cells)
already leave by os._exit. harness/__init__.py imports this module, so every process does it.
"""

import atexit
import gc

atexit.register(gc.freeze)
