"""How a model is opened when nothing says otherwise, and what its input size and batch may be: the one home of these
defaults and bounds (every command's option, config field and function signature reads them here). Light on purpose
(no numpy or torch), so that ``--help`` shows them.
"""

from scdino.bounds import Bound, declare

#: the entry of a DINO checkpoint whose backbone is used (DINO keeps a student and a teacher; the teacher is the one
#: evaluated in the paper)
CHECKPOINT_KEY = "teacher"
#: how an RGB model's patch embedding is adapted to the run's channels (see :mod:`scdino.models.adapt`)
ADAPT = "mean"
#: the side in pixels of a model input where neither the model nor the run says (DINO's, and random models')
INPUT_SIZE = 224
#: what an input size may be
INPUT_SIZE_BOUND = Bound("model input side in px", low=1, integer=True)
#: what a batch size may be (the batch rules themselves: :mod:`scdino.batches`)
BATCH_SIZE_BOUND = Bound("crops per forward pass", low=1, integer=True)
declare(input_size=INPUT_SIZE_BOUND, batch_size=BATCH_SIZE_BOUND)
