"""Text in, token batches out. Import the module you need; only the last two import Lightning.

* ``tokenizers``: characters, GPT-2 BPE (tiktoken) and a trained BPE, with one small interface;
* ``corpus``: a text source tokenized once into flat arrays of token ids in a cache;
* ``shards``: a large corpus tokenized into token shards in parallel, resumably, and read back;
* ``batching``: batches of similar length under a token budget;
* ``lm``: ``LMDataModule``, windows of a corpus for a language model;
* ``translation``: ``TranslationDataModule``, parallel text for the seq2seq model.
"""
