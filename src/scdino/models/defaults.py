"""How a model is opened when nothing says otherwise: the one home of these defaults (every command's option, config
field and function signature reads them here). Light on purpose (no imports), so that ``--help`` shows them.
"""

#: the entry of a DINO checkpoint whose backbone is used (DINO keeps a student and a teacher; the teacher is the one
#: evaluated in the paper)
CHECKPOINT_KEY = "teacher"
#: how an RGB model's patch embedding is adapted to the run's channels (see :mod:`scdino.models.adapt`)
ADAPT = "mean"
#: the side in pixels of a model input where neither the model nor the run says (DINO's, and random models')
INPUT_SIZE = 224
