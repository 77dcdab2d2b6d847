"""
The sandbox: model-generated code is untrusted, so it runs only here, in a child process, and the
verdict ("pass", "fail", "error" or "timeout") is decided on the trusted side.

    from sandbox import execute, execute_many
    execute("def f(x):\n    return x + 1\n", "assert f(1) == 2\n")   # 'pass'

How it runs. The child is forked from a zygote, a fresh `python -I -S` of trusted code only (no environment,
a session of its own) that has already imported what a child needs, so a run costs a fork, not an
interpreter's start-up; there is one zygote per concurrent run, kept for the life of this process. The child
closes every file it inherited but its output, so it cannot reach the zygote's pipes to this process; the
zygote kills it when the wall clock runs out and sends back its output. A zygote that dies, answers late or
answers more than a child may write is replaced, and its job is an "error" (a warning says so, once).

What it protects against. Each child has a wall-clock limit (then it is killed: only that is a
"timeout"), CPU-time, 512 MB memory, 16 open files and 256 KB output limits (so memory it holds outside
its address space, in memfd files or pipes, stays a few MB), no new processes, an empty environment, and
an in-process guard against fork, exec, kill, memfd_create, pipes, deleting and writing files. As root,
the child drops root before the program runs, or the program never runs (verdict "error"; a warning says
why, once): it locks itself into an empty folder owned by root (chroot) and becomes a uid of its own,
one per concurrent slot. There the program can create, read or delete no file, load no module from a
file, start no process, and signal no process but itself: not its neighbours, not the harness. Tests in
the world's shape, lines of `assert name(<literals>) == <literal>`, are judged here: the child only
reports what the function returns, as plain values, and the parent reads each back (at most REPORT_LIMIT
characters, in linear time) and compares it with the expected value, which never reaches the child. So
"pass" means the function returned those values, whatever the program did to its interpreter.

What it does not protect against. Other tests run in the program's interpreter, where determined code
can find the token that reports success. Without root there is no chroot and no uid of its own: code
that undoes the guard (rebuilding posix from _imp) can read and write wherever this user can, leave
files behind and signal this user's processes, the harness and its zygotes included. The network is not
cut off (the chroot only keeps out a socket module that is a separate file). Kernel bugs, and the CPU and
memory it shares with the machine: for code written by an adversary, use a container or a VM.
"""
import ast
import atexit
import marshal
import os
import queue
import re
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

EXEC_TIMEOUT = 3.0
MEMORY_LIMIT = 512 * 2**20  # bytes of address space, roomy for Python's startup
OUTPUT_LIMIT = 256 * 2**10  # bytes the child may write to any file, its captured output included
# Files the child may hold open. Memory in a file (memfd_create) or in a pipe lies outside the address space
# that MEMORY_LIMIT caps: this caps how many such buffers a child holds, each of at most OUTPUT_LIMIT (a file)
# or 1 MB (a pipe), so a few MB in all where 2400 files once held 600 MB.
OPEN_FILES_LIMIT = 16
# As root each running child gets a uid of its own: UID_BASE + pid * SLOTS + slot. Linux pids stay below
# 2**22, so these uids fill [2**30, 2**31), far above any login account, and never repeat between two
# processes that run sandboxes side by side, nor between two slots of one process.
UID_BASE, SLOTS = 2**30, 256
REPORT_LIMIT = 2**14  # characters of one reported value, read no further: the world's take under 100
IMPORTABLE = {'collections', 'functools', 'itertools', 'math', 're', 'string'}  # what a program may import as root
ANSWER_MARGIN = 2.0  # seconds past the timeout a zygote may take to start, end its child and answer, or be replaced
_slots = queue.SimpleQueue()  # the free slots of this process; a child's slot is free again once it is dead
for _slot in range(SLOTS):
    _slots.put(_slot)
_idle = queue.SimpleQueue()  # zygotes waiting for a job, kept for the life of this process
os.register_at_fork(after_in_child=lambda: globals().update(_idle=queue.SimpleQueue()))  # not the parent's
# A zygote: a fresh interpreter of trusted code, started once per worker, that imports what every child needs and
# then forks a child per job, so no child pays Python's start-up (10 ms, most of a run). It reads a job, length-
# prefixed, on its stdin (so the job is in no file, argv or environment), waits for the child at most the timeout,
# kills it, and answers on its stdout: whether the clock ran out, then the child's output. The child leaves the
# loop and runs the harness below it, before the untrusted code, in the module the program sees as __main__.
ZYGOTE = f'import {", ".join(sorted(IMPORTABLE))}  # after the chroot no module can load: load them now\n' + r'''
import _io, builtins, io, marshal, os, posix, resource, select, sys, time
write, exit_now = os.write, os._exit  # the harness keeps these; the guard takes them from the program
compile('', '<warm-up>', 'exec')  # the first compile() makes the ast node types (1.5 ms): here, not in every child
def read(n):  # n bytes of the job, or the end of the zygote once the parent has closed its pipe
    data = b''
    while len(data) < n:
        data += os.read(0, n - len(data)) or exit_now(0)
    return data
def report(*words):  # a line of its own, marked with this run's random token
    write(1, ('\n' + ' '.join((token,) + words) + '\n').encode())
while True:
    program, tests, token, limits, uid, folder, timeout = marshal.loads(read(int.from_bytes(read(4), 'little')))
    output, start = os.memfd_create('output'), time.monotonic()  # unnamed: only the child's stdout and stderr
    child = os.fork()
    if child == 0:
        break
    ended, pidfd = select.poll(), os.pidfd_open(child)  # a pidfd is readable once its process is dead
    ended.register(pidfd, select.POLLIN)
    ended.poll(timeout * 1000)
    os.kill(child, 9)  # it cannot have started other processes: killing it ends all it ran
    os.waitpid(child, 0)
    answer = bytes([time.monotonic() - start >= timeout]) + os.pread(output, limits['RLIMIT_FSIZE'], 0)
    write(1, len(answer).to_bytes(4, 'little') + answer)
    os.close(output), os.close(pidfd)
    del answer  # the next child is not to find what this one wrote
# the child: stdout and stderr to its output, stdin an empty pipe, every other file closed (the zygote's pipes to
# the parent above all), then the limits, and its folder
os.dup2(output, 1), os.dup2(output, 2), os.dup2(os.pipe()[0], 0)
os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
for name, value in limits.items():
    resource.setrlimit(getattr(resource, name), (value, value))
os.chdir(folder)
if uid is not None:  # root: drop it for good before the program runs, or never run the program (fail closed)
    try:
        os.chroot('.'); os.chdir('/'); os.setgroups([]); os.setgid(uid); os.setuid(uid)
        if os.getresuid() != (uid,) * 3 or os.getresgid() != (uid,) * 3:
            raise PermissionError('root was not dropped')
    except Exception as e:
        report('refused', f'{type(e).__name__}: {e}')
        exit_now(0)
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no new processes (nor threads) for this uid
def blocked(*args, **kwargs):
    raise PermissionError('blocked by the sandbox')
for name in ('fork forkpty system popen execv execve spawnv spawnve posix_spawn posix_spawnp kill killpg abort '
             '_exit remove unlink rmdir removedirs rename renames replace truncate chmod chown lchown link '
             'symlink mkdir mkfifo mknod memfd_create pipe pipe2 putenv unsetenv setuid setgid setsid chdir chroot '
             'open').split():
    setattr(os, name, blocked); setattr(posix, name, blocked)  # os re-exports posix's functions
for name in ('subprocess', 'multiprocessing', '_posixsubprocess', 'ctypes', '_ctypes', 'socket', '_socket'):
    sys.modules[name] = None  # importing it now raises ImportError
real_open = builtins.open
def read_only_open(file, mode='r', *args, **kwargs):
    if set(mode) & set('wax+'):
        raise PermissionError('writing files is blocked by the sandbox')
    return real_open(file, mode, *args, **kwargs)
builtins.open = io.open = _io.open = read_only_open
def words(value):  # strictly plain types, no class of the program's: one word 'type:payload' per value, where
    kind = type(value)  # a container's payload is its length and its items' words follow
    if kind in (list, tuple, set, dict):
        items = [x for item in value.items() for x in item] if kind is dict else value
        return ' '.join([f'{kind.__name__}:{len(value)}', *map(words, items)])
    if kind in (str, bytes):  # in hex: no space or newline inside a word
        return f'{kind.__name__}:' + (value.encode('utf-8', 'surrogatepass') if kind is str else value).hex()
    return f'{kind.__name__}:{value!r}' if kind in (bool, int, float, complex, type(None)) else 'not-plain'
namespace = {'__name__': '__main__'}
try:
    exec(compile(program, '<program>', 'exec'), namespace)
    if isinstance(tests, str):  # any other tests run here; only a line with the token reports how they went
        try:
            exec(compile(tests, '<tests>', 'exec'), namespace)
            report('pass')
        except AssertionError:
            report('fail')
    else:  # the world's tests: report what each call returns; the parent, who alone knows the answers, judges
        for i, (name, args) in enumerate(tests):
            value = eval(name, namespace)(*args)
            report(str(i), words(value))
except BaseException:  # errors, SystemExit, KeyboardInterrupt: what was reported stands, the rest is missing
    pass
exit_now(0)  # skip any atexit handlers and finalizers the program left
'''


def _calls(tests):
    """Tests in the world's shape, one `assert name(<literals>) == <literal>` per statement, as a list
    of (name, args, expected); None for any other tests."""
    calls = []
    try:
        for node in ast.parse(tests).body:
            match node:
                case ast.Assert(test=ast.Compare(left=ast.Call(func=ast.Name(id=name), args=args, keywords=[]),
                                                 ops=[ast.Eq()], comparators=[expected]), msg=None):
                    calls.append((name, tuple(map(ast.literal_eval, args)), ast.literal_eval(expected)))
                case _:
                    return None
    except Exception:  # not Python, or not literals
        return None
    return calls or None


# The harness's words() read back, one step per word: time linear in the length of the line, where
# ast.literal_eval took seconds on a forged line (Python 3.11 parses f-strings in quadratic time)
SCALARS = {'bool': lambda s: s == 'True', 'int': int, 'float': float, 'complex': complex, 'NoneType': lambda s: None,
           'str': lambda s: bytes.fromhex(s).decode('utf-8', 'surrogatepass'), 'bytes': bytes.fromhex}
CONTAINERS = {'list': list, 'tuple': tuple, 'set': set, 'dict': lambda items: dict(zip(items[::2], items[1::2]))}


def _value(words):
    """The value spelled by the iterator words (what the harness's words() wrote), or an exception."""
    kind, _, payload = next(words).partition(':')
    if kind in CONTAINERS:  # a forged length runs out of words (StopIteration) after as many steps as words
        return CONTAINERS[kind]([_value(words) for _ in range(int(payload) * (2 if kind == 'dict' else 1))])
    return SCALARS[kind](payload)


_warned = set()


def _warn(message):
    """Say something about the harness itself (not about a program) on stderr, once per process."""
    if message not in _warned:
        _warned.add(message)
        print(f'sandbox: {message}', file=sys.stderr, flush=True)


def _zygote():
    """A zygote for one job: one waiting for a job, or a new one if none is (one that died waiting is dropped)."""
    while True:
        try:
            zygote = _idle.get_nowait()
        except queue.Empty:
            return subprocess.Popen([sys.executable, '-I', '-S', '-c', ZYGOTE], env={}, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, start_new_session=True)
        if zygote.poll() is None:
            return zygote
        _stop(zygote)


def _stop(zygote):
    """End a zygote and any child it still runs (they share its process group, which its pid names until it is
    reaped), and close its pipes."""
    if zygote.returncode is None:
        os.killpg(zygote.pid, signal.SIGKILL)
        zygote.wait()
    for pipe in (zygote.stdin, zygote.stdout):
        try:
            pipe.close()
        except OSError:  # the rest of a job it never read
            pass


@atexit.register
def _stop_idle_zygotes():
    while not _idle.empty():
        _stop(_idle.get())


def _read(zygote, n, deadline):
    """n bytes of a zygote's answer; an error if it ends first, or has not sent them by the deadline."""
    data, ready = b'', select.poll()
    ready.register(zygote.stdout, select.POLLIN)
    while len(data) < n:
        if not ready.poll(max(0.0, deadline - time.monotonic()) * 1000):
            raise TimeoutError('no answer in time')
        chunk = os.read(zygote.stdout.fileno(), n - len(data))
        if not chunk:
            raise EOFError('the zygote ended')
        data += chunk
    return data


def _run(job, timeout):
    """Run job (program, tests or calls, token) in a child of a zygote: (its output, whether the wall clock ran out
    before it ended). Only that is a timeout, not the signal that ended the child: a program can send itself
    SIGKILL or SIGXCPU, and RLIMIT_CPU, above the wall clock, fires only if the zygote is late."""
    root = os.geteuid() == 0
    if not root:
        _warn('not running as root: programs run as this user, with no chroot and no uid of their own, '
              'behind an in-process guard only (see sandbox.py)')
    slot, scratch, zygote = _slots.get() if root else None, None, None
    try:
        # the child's folder, made read-only: owned by root it is the chroot, where the program can create nothing
        scratch = tempfile.mkdtemp(prefix=f'sandbox-{os.getpid()}-')
        os.chmod(scratch, 0o555)
        limits = {'RLIMIT_CPU': int(timeout) + 1, 'RLIMIT_AS': MEMORY_LIMIT, 'RLIMIT_FSIZE': OUTPUT_LIMIT,
                  'RLIMIT_NOFILE': OPEN_FILES_LIMIT, 'RLIMIT_CORE': 0}
        uid = UID_BASE + os.getpid() * SLOTS + slot if root else None
        zygote, job = _zygote(), marshal.dumps((*job, limits, uid, scratch, timeout))
        try:
            zygote.stdin.write(len(job).to_bytes(4, 'little') + job)
            zygote.stdin.flush()
            deadline = time.monotonic() + timeout + ANSWER_MARGIN
            size = int.from_bytes(_read(zygote, 4, deadline), 'little')
            if not 1 <= size <= 1 + OUTPUT_LIMIT:
                raise ValueError('an answer longer than a child may write')
            answer = _read(zygote, size, deadline)
        except (OSError, EOFError, ValueError):  # TimeoutError and BrokenPipeError are OSErrors
            _warn('a zygote died, or answered late or wrong: its job counts as an error, and a new zygote '
                  'takes its place')
            return b'', False  # no report from the child: "error"
        _idle.put(zygote)  # it answered in full: it waits for the next job
        zygote = None
        return answer[1:], answer[0] == 1  # at most OUTPUT_LIMIT bytes
    finally:  # a zygote that failed ends here, with the child it ran. The child is dead: its slot is free again. As
        if zygote:  # root its folder is empty: one rmdir removes it; without root, whatever a program left there
            _stop(zygote)  # stays, and rmdir's error makes the verdict "error"
        if root:
            _slots.put(slot)
        if scratch:
            os.rmdir(scratch)


def execute(program, tests, timeout=EXEC_TIMEOUT):
    """Run program then tests in a sandboxed child: "pass"; "fail" (an assert failed); "error" (syntax
    or runtime error, or the program exited or was killed, by itself included, before the tests reported,
    or the harness could not run it); "timeout" (the wall clock ran out first). Never raises. Tests in the
    world's shape are judged here from the values the child reports; others by a line with this run's
    random token, written by the harness after the tests, so printing "pass" or exiting early does not fake
    one."""
    calls, token = _calls(tests), secrets.token_hex(16)
    try:
        job = (program, tests if calls is None else [c[:2] for c in calls], token)
        output, timed_out = _run(job, timeout)
    except Exception as e:  # no disk, no processes left, or files a program left without root: go on, say why
        _warn(f'could not run a program or clean up after it ({type(e).__name__}: {e}); it counts as an error')
        return 'error'
    found = dict(re.findall(f'^{token} (\\S+) ?(.*)$', output.decode('latin-1'), re.MULTILINE))
    if 'refused' in found:
        _warn(f'the child could not drop root ({found["refused"]}), so no program runs: every verdict is "error"')
        return 'error'
    if calls is not None:  # in order, as the asserts would run; the child never saw an expected value
        for i, (_, _, expected) in enumerate(calls):
            if str(i) not in found:
                break
            text = found[str(i)]
            try:  # plain values on both sides: a trusted ==
                right = len(text) <= REPORT_LIMIT and _value(iter(text.split(' '))) == expected
            except Exception:  # not words of plain values ("not-plain", a forged line): not the expected value
                right = False
            if not right:
                return 'fail'
        else:
            return 'pass'
    if timed_out:
        return 'timeout'
    return next((s for s in ('pass', 'fail') if calls is None and s in found), 'error')


def execute_many(jobs, timeout=EXEC_TIMEOUT, workers=None):
    """execute() over (program, tests) pairs in parallel; results in input order."""
    # a run mostly waits (on its zygote's fork, its child, the answer), so by default 4 per core
    with ThreadPoolExecutor(workers or 4 * os.cpu_count()) as pool:
        return list(pool.map(lambda job: execute(*job, timeout), jobs))
