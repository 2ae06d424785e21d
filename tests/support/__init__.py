"""What the tests share, by noun: the fake model server (`fake_upstream`, and `upstream_process` to run it
alone), sidecars in the test's loop (`sidecars`) and as processes (`processes`), clients (`clients`), request
bodies (`bodies`), PostgreSQL (`postgres`), faults on the wire (`faults`), disks that fill up (`disks`),
stores (`stores`), waits (`waits`), the invariants checked after every test (`invariants`), an OTLP receiver,
a real model server (`real_model`) and helm (`helm`); shared fixtures in `fixtures`. Test files import from
here, never from each other."""
