"""Files in and out, for every script: all-or-nothing writes, input read with file:line errors, one `fail`.

Writing. A file or folder appears at its final name only complete: it is written under a temporary
name in the same folder (same file system, so the rename is atomic), flushed to disk, then renamed
over the old one. On any failure (an exception, a full disk, Ctrl-C) the temporary file or folder
is removed and the old output stays as it was; a `kill -9` can leave a temporary named
`.<name>.<random>.tmp` behind, never a half-written output.

    write_text(path, text)            write_json(path, obj)            write_jsonl(path, rows)
    with replacing(path) as tmp: fig.savefig(tmp)          # anything that writes a path itself
    with replacing_folder(folder) as tmp: model.save_pretrained(tmp)
    with OutputGroup() as out: out.write_text(a, ...); out.write_text(b, ...)   # several files:
        # every file is written first, then renamed in order, so an error leaves none of them new

A write that fails with an OSError (full disk, no permission) stops the script with a message that
says what could not be written and why in words (`fail`), unless the caller catches WriteError.

Reading. `read_text` reads UTF-8, drops a leading byte-order mark (Windows editors write one) and
reports undecodable input by line number. `read_jsonl` reads JSON Lines with a file:line message
for each kind of bad line; `read_appended_jsonl` reads a file this project appends to (a kill can
cut its last line: that line is dropped with a notice, anything else is an error).

Errors the user can fix go through `fail(where, what, todo)`: "<script>: <where>: <what>; <todo>",
no traceback, exit code 1 (2 for a wrong command line, as argparse does).
"""

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BOM = "\ufeff"
_REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Stopping with a message
# ---------------------------------------------------------------------------------------------

class UserError(SystemExit):
    """A problem the user can fix. str() is the message; `code` the exit status (1 or 2)."""

    def __init__(self, message, code=1):
        # SystemExit with a string prints it and exits 1; any other status is printed by fail().
        super().__init__(message if code == 1 else code)
        self.message = message

    def __str__(self):
        return self.message


class WriteError(UserError):
    """An output that could not be written (full disk, no permission); `path`, `error` say which and why."""

    def __init__(self, message, path, error):
        super().__init__(message)
        self.path, self.error = path, error


def program():
    """The running script's file name: the outermost top-level script on the stack (the tests call
    main() in-process), else sys.argv[0]."""
    name = None
    frame = sys._getframe(1)
    while frame is not None:
        file = Path(frame.f_code.co_filename)
        if file.suffix == ".py" and file.parent == _REPO:
            name = file.name
        frame = frame.f_back
    return name or Path(sys.argv[0]).name


def fail(where, what, todo, code=1):
    """Stop with "<script>: <where>: <what>; <todo>" on stderr, no traceback, exit status `code`."""
    message = f"{program()}: {where}: {what}; {todo}"
    if code != 1:
        print(message, file=sys.stderr, flush=True)
    raise UserError(message, code)


def fail_with(error, code=1):
    """Stop with the message of an error raised by a library function ("--teacher x: ..."), no traceback."""
    message = f"{program()}: {error}"
    if code != 1:
        print(message, file=sys.stderr, flush=True)
    raise UserError(message, code)


def describe_os_error(error):
    """An OSError in words, saying plainly when the disk is full."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({error.strerror})"
    return error.strerror or str(error)


def write_error(path, error, todo="free some space or fix the permissions, then run again"):
    """The WriteError for `error` while writing `path` (raise it)."""
    message = f"{program()}: {path}: could not be written: {describe_os_error(error)}; {todo}"
    return WriteError(message, path, error)


# ---------------------------------------------------------------------------------------------
# Writing: temporary name, fsync, rename; cleaned up on failure
# ---------------------------------------------------------------------------------------------

def _temporary_name(path):
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
    return Path(name)


def _remove(path):
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _fsync(path):
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a read-only handle
        handle = os.open(path, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@contextlib.contextmanager
def replacing(path):
    """Yield a temporary path beside `path` to write; on success it replaces `path`, on failure it goes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_name(path)
    except OSError as error:
        raise write_error(path, error) from None
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as error:
        _remove(tmp)
        raise write_error(path, error) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def replacing_folder(folder):
    """Yield a temporary folder beside `folder` to fill; on success it replaces `folder` (the old one is
    removed only then), on failure it goes."""
    folder = Path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    except OSError as error:
        raise write_error(folder, error) from None
    try:
        yield tmp
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.{os.getpid()}.old")
            _remove(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            _remove(old)
    except OSError as error:
        _remove(tmp)
        raise write_error(folder, error) from None
    except BaseException:
        _remove(tmp)
        raise


def _encoded(text, path):
    """UTF-8 bytes of `text`; text that UTF-8 cannot hold (a lone surrogate) is an error before any write."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        line = text.count("\n", 0, error.start) + 1
        fail(f"{path} (line {line})", f"the text holds {text[error.start:error.end]!r}, which UTF-8 cannot encode "
             "(a lone surrogate)", "fix that string in the input")


def jsonl_text(rows):
    return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)


def json_text(obj):
    return json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def write_text(path, text):
    """Write `text` (UTF-8, "\\n" line ends) to `path` all-or-nothing."""
    data = _encoded(text, path)
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path, obj):
    return write_text(path, json_text(obj))


def write_jsonl(path, rows):
    return write_text(path, jsonl_text(rows))


class OutputGroup:
    """Several output files that appear together or not at all.

    Inside the `with` block every write goes to a temporary file; when the block ends without an
    error they are renamed into place in the order written (put a completion marker last), else all
    of them are removed and no output changes.
    """

    def __init__(self):
        self.pending = []  # (temporary, final)

    def __enter__(self):
        return self

    def write_text(self, path, text):
        return self.write_bytes(path, _encoded(text, Path(path)))

    def write_bytes(self, path, data):
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temporary_name(path)
            self.pending.append((tmp, path))
            tmp.write_bytes(data)
            _fsync(tmp)
        except OSError as error:
            raise write_error(path, error) from None
        return path

    def __exit__(self, kind, value, traceback):
        try:
            if kind is None:
                for tmp, path in self.pending:
                    try:
                        os.replace(tmp, path)
                    except OSError as error:
                        raise write_error(path, error) from None
        finally:
            for tmp, _ in self.pending:
                if tmp.exists():
                    _remove(tmp)
        return False


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def _where(path, line=None, argument=None):
    """"--train-file data/x.jsonl:3": the argument that named the file (if any), the file, the line."""
    place = f"{path}:{line}" if line is not None else str(path)
    return f"{argument} {place}" if argument else place


def read_text(path, argument=None, todo="check the path"):
    """The text of a UTF-8 file without a leading byte-order mark; bad input stops with its line number.

    argument: the command-line option that named the file, for the messages; todo: the fix for a
    missing file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fail(_where(path, argument=argument), "no such file", todo)
    except IsADirectoryError:
        fail(_where(path, argument=argument), "is a folder, not a file", "pass the file")
    except OSError as error:
        fail(_where(path, argument=argument), f"cannot be read: {describe_os_error(error)}",
             "check the path and its permissions")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        fail(_where(path, line, argument), f"not UTF-8 (byte 0x{data[error.start]:02x} at column {column})",
             "convert the file to UTF-8")
    return text[1:] if text.startswith(BOM) else text


def read_json(path, argument=None, todo="check the path"):
    """One JSON value from a file (BOM allowed), errors with file:line."""
    text = read_text(path, argument, todo)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        fail(_where(path, error.lineno, argument), f"invalid JSON ({error.msg}, column {error.colno})", "fix or regenerate the file")


def _parse_jsonl(path, text, required, text_fields, unique_ids, torn_end_ok, argument=None):
    lines = text.split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows, first_line_of_id, torn = [], {}, None
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        where = _where(path, index + 1, argument)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            # Only the last line of an appended file can be cut short by a kill or a full disk.
            if torn_end_ok and index == last and not text.endswith("\n"):
                torn = index + 1
                break
            fail(where, f"invalid JSON ({error.msg}, column {error.colno})", "fix or regenerate the file")
        if not isinstance(row, dict):
            fail(where, f"expected a JSON object per line, got {type(row).__name__}", "fix or regenerate the file")
        missing = [field for field in required if field not in row]
        if missing:
            fail(where, f"row lacks {', '.join(missing)}", "files made by this project's scripts have them")
        for field in text_fields:
            if not isinstance(row.get(field), str):
                fail(where, f"{field} is {json.dumps(row.get(field))}, not a string",
                     f"every row needs its {field} as text (\"\" when empty)")
        if unique_ids:
            if row["id"] in first_line_of_id:
                fail(where, f"id {row['id']!r} appears twice (first on line {first_line_of_id[row['id']]})",
                     "every row needs its own id")
            first_line_of_id[row["id"]] = index + 1
        rows.append(row)
    return rows, torn


def read_jsonl(path, required=(), text_fields=(), unique_ids=False, allow_empty=True, argument=None,
               todo="run prepare_data.py first, or check the path"):
    """Rows of a JSON Lines file (dicts, BOM allowed, blank lines skipped); a bad line stops with file:line.

    required: fields every row must have; text_fields: fields that must be strings;
    unique_ids: an id seen twice is an error; allow_empty=False: a file without rows is an error;
    argument: the option that named the file, for the messages; todo: the fix for a missing file.
    """
    text = read_text(path, argument, todo)
    rows, _ = _parse_jsonl(path, text, required, text_fields, unique_ids, False, argument)
    if not rows and not allow_empty:
        fail(_where(path, argument=argument), "no rows (an empty file)", "regenerate it")
    return rows


def read_appended_jsonl(path, required=()):
    """Rows of a JSON Lines file that this project appends to, and whether its last line was cut.

    A kill or a full disk can leave the last line incomplete (no newline, not JSON): that line is
    dropped with a notice on stderr and `torn` is True; the caller rewrites the file without it.
    A missing file has no rows.
    """
    if not Path(path).exists():
        return [], False
    rows, torn = _parse_jsonl(path, read_text(path), required, (), False, True)
    if torn:
        print(f"{path}:{torn}: dropping a last line cut mid-write (a killed run or a full disk)", file=sys.stderr)
    return rows, torn is not None
