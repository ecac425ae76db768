from adtr.errors import AdtrError, compile_failure, file_error, first_line


def test_first_line_keeps_one_line_or_names_the_type():
    assert first_line(RuntimeError("  bad thing\n  at frame 1\n")) == "bad thing"
    assert first_line(ValueError("")) == "ValueError"


def test_compile_failure_is_one_line_naming_the_cause_and_the_requirement():
    text = compile_failure(RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n  traceback..."))
    assert text == ("torch.compile failed (RuntimeError: InvalidCxxCompiler: No working C++ compiler found); "
                    "it needs a C++ compiler on the CPU and Triton on a GPU")


def test_file_error_names_the_file():
    error = file_error("a/b.png", "not an image")
    assert isinstance(error, AdtrError) and str(error) == "a/b.png: not an image"
