class StopStrings:
    """Decodes one sequence's completion a token at a time and finds the first of its stop strings.

    Each step decodes only the tokens since the last complete text, together with the tokens of the
    step before as context (tokenizers that fold a leading space into a word decode a lone token
    differently), and waits while the text ends in an incomplete character.
    """

    def __init__(self, stop: tuple[str, ...], num_prompt_tokens: int):
        self.stop = stop
        self.longest = max(map(len, stop))
        self.text = ""
        self.matched = False
        self.prefix_offset = self.read_offset = num_prompt_tokens

    def update(self, tokenizer, token_ids: list[int]) -> bool:
        """Takes the sequence's tokens after a new one was appended; True once a stop string appears,
        and then `text` is the completion's text before it."""
        prefix = tokenizer.decode(token_ids[self.prefix_offset:self.read_offset])
        text = tokenizer.decode(token_ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return False
        # A stop string that was not in the old text ends in the new part, so it starts at most
        # longest - 1 characters before it.
        start = max(len(self.text) - self.longest + 1, 0)
        self.text += text[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(token_ids)
        found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.matched = True
        return self.matched
