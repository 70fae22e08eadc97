"""moekit's data layer: the embedded corpus, tokenizers, and memory-mapped token datasets.

Everything a training run needs ships inside the package or is built locally, so the default run
works offline (the README's "make run" section):

- corpus: Shakespeare's complete works, with whole plays held out for validation
  (:func:`load_shakespeare`, :func:`list_plays`);
- tokenizer: a 4096-entry byte-level BPE trained on the train split (:func:`load_tokenizer`),
  or train your own offline (:func:`train_tokenizer`);
- datasets: a user's ``.txt`` / ``.jsonl`` files or folder (:func:`iter_texts`), tokenized once to a
  cached token file (:func:`tokenize_to_file`) and sampled deterministically (:class:`TokenDataset`);
  :func:`prepare_data` does all of it for the trainer;
- tasks: a corpus per task (``--data NAME=PATH``, or ``"task"`` fields in ``.jsonl`` records), each with
  its own held-out tail (:func:`prepare_tasks`), mixed into batches row by row (:class:`TaskMixture`).

Every input problem raises :class:`DataError` (a ``ValueError``) with one line naming the file.
"""

from moekit.data.corpus import VAL_PLAYS, list_plays, load_plays, load_shakespeare
from moekit.data.dataset import (
    TokenDataset,
    TokenFileInfo,
    iter_texts,
    list_data_files,
    prepare_data,
    read_token_meta,
    source_fingerprint,
    tokenize_to_file,
)
from moekit.data.errors import DataError
from moekit.data.tasks import TaskMixture, prepare_tasks
from moekit.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    bytes_per_token,
    decode,
    encode,
    find_eos_id,
    load_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "VAL_PLAYS",
    "DataError",
    "TaskMixture",
    "TokenDataset",
    "TokenFileInfo",
    "bytes_per_token",
    "decode",
    "encode",
    "find_eos_id",
    "iter_texts",
    "list_data_files",
    "list_plays",
    "load_plays",
    "load_shakespeare",
    "load_tokenizer",
    "prepare_data",
    "prepare_tasks",
    "read_token_meta",
    "source_fingerprint",
    "tokenize_to_file",
    "tokenizer_hash",
    "train_tokenizer",
]
