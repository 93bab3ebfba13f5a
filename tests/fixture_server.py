"""A local HTTP server for the download tests: serves files from a dict on 127.0.0.1, honours Range, and can
fail on purpose: cut a response short, answer 500 or 429, ignore Range ('norange': the whole file, 200), or 404
what it does not have. Bounded: it serves only the
requests the tests make and stops with them."""
import http.server
import threading


class FixtureServer:
    def __init__(self):
        self.files = {}       # path -> bytes (or a callable(query) -> (bytes, headers) for APIs)
        self.faults = {}      # path -> list of 'cut' / '500' / '429' / 'norange', consumed one per request
        self.log = []         # (path, Range header) of every request
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path, _, query = self.path.partition('?')
                server.log.append((path, self.headers.get('Range')))
                fault = server.faults.get(path, []).pop(0) if server.faults.get(path) else None
                if fault in ('500', '429'):
                    return self.send_error(int(fault))
                if path not in server.files:
                    return self.send_error(404)
                body, headers = server.files[path], {}
                if callable(body):
                    body, headers = body(query)
                start = 0
                if self.headers.get('Range') and fault != 'norange':
                    start = int(self.headers['Range'].split('=')[1].split('-')[0])
                    if start >= len(body):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
                else:
                    self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header('Content-Length', str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                self.wfile.write(chunk[:len(chunk) // 2] if fault == 'cut' else chunk)  # 'cut': close half-way

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def serve_benchmarks(server, prepare_data):
    """Small fixtures of GSM8K, HumanEval and the BIG-bench Lite tasks, in their own formats at their own paths, at
    prepare_data's pinned commits (logical_deduction keeps its examples in a subtask folder, listed by the GitHub
    contents API). They are not the pinned files: prepare them with --allow_unpinned=true."""
    import gzip
    import json
    gsm = [{'question': f'What is {i} + {i}?', 'answer': f'{i} + {i} = <<{i}+{i}={2 * i}>>{2 * i}\n#### {2 * i}'}
           for i in range(100)]
    base = f'/openai/grade-school-math/{prepare_data.gsm8k_commit}/grade_school_math/data'
    for split in ('train', 'test'):
        server.files[f'{base}/{split}.jsonl'] = ''.join(json.dumps(r) + '\n' for r in gsm).encode()
    he = [{'task_id': f'HumanEval/{i}', 'prompt': f'def add{i}(a, b):\n', 'canonical_solution': '    return a + b\n',
           'test': 'def check(f):\n    assert f(2, 3) == 5\n', 'entry_point': f'add{i}'} for i in range(3)]
    server.files[f'/openai/human-eval/{prepare_data.humaneval_commit}/data/HumanEval.jsonl.gz'] = \
        gzip.compress(''.join(json.dumps(r) + '\n' for r in he).encode())
    tasks = f'/google/BIG-bench/{prepare_data.bigbench_commit}/bigbench/benchmark_tasks'
    for t in prepare_data.BBL_TASKS:
        examples = [{'input': f'{t} q{i}', 'target_scores': {'yes': i % 2, 'no': 1 - i % 2}} for i in range(150)]
        if t == 'logical_deduction':
            server.files[f'{tasks}/{t}/task.json'] = json.dumps({'name': t}).encode()
            server.files[f'/repos/google/BIG-bench/contents/bigbench/benchmark_tasks/{t}'] = json.dumps(
                [{'name': 'three_objects', 'type': 'dir'}, {'name': 'README.md', 'type': 'file'}]).encode()
            server.files[f'{tasks}/{t}/three_objects/task.json'] = json.dumps({'examples': examples[:20]}).encode()
        else:
            server.files[f'{tasks}/{t}/task.json'] = json.dumps({'examples': examples}).encode()
    return gsm, he
