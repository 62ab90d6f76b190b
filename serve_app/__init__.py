"""chatglm2-serve: ChatGLM2-6B as a Ray Serve application."""
