"""The OpenAI-compatible face: the Responses API and Chat Completions (stored ones too) over the relay's
requests, so that a program written for the official SDKs works with `base_url` pointed at the relay.
`routes` wires it into the app; see docs/openai.md."""
