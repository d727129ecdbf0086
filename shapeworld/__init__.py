"""Shape world: a small world we fully control (scenes, images, text of every kind, a checker) for running ARMOR's
experiment in miniature. `world` generates and draws scenes, `data` writes conversation records and trains the
tokenizer, `checker` reads scenes back from images and scores drawings."""
