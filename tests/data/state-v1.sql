BEGIN TRANSACTION;
CREATE TABLE allocations (id INTEGER PRIMARY KEY, type TEXT NOT NULL, holder INTEGER NOT NULL,
                          start INTEGER NOT NULL, path TEXT NOT NULL, dying INTEGER NOT NULL);
INSERT INTO "allocations" VALUES(1,'sev',13404,64095,'/a/b',0);
INSERT INTO "allocations" VALUES(2,'sev',13404,64095,'/a/b',0);
INSERT INTO "allocations" VALUES(3,'sev',13405,64095,'/d',1);
INSERT INTO "allocations" VALUES(510,'sev_es',13404,64095,'/a/b',0);
CREATE TABLE cgroups (path TEXT PRIMARY KEY, subtree_control TEXT NOT NULL,
                      max_depth INTEGER NOT NULL, max_descendants INTEGER NOT NULL,
                      freeze INTEGER NOT NULL, encids_max TEXT);
INSERT INTO "cgroups" VALUES('/','encids',2147483647,2147483647,0,'{"sev": 18446744073709551615, "sev_es": 18446744073709551615}');
INSERT INTO "cgroups" VALUES('/a/b','',2147483647,2147483647,0,'{"sev": 18446744073709551615, "sev_es": 7}');
INSERT INTO "cgroups" VALUES('/a','encids',2147483647,10,0,'{"sev": 5, "sev_es": 18446744073709551615}');
INSERT INTO "cgroups" VALUES('/c','',3,2147483647,1,'{"sev": 18446744073709551615, "sev_es": 18446744073709551615}');
CREATE TABLE members (pid INTEGER PRIMARY KEY, start INTEGER NOT NULL, path TEXT NOT NULL);
INSERT INTO "members" VALUES(13404,64095,'/a/b');
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('application','encidfs');
INSERT INTO "meta" VALUES('schema','1');
INSERT INTO "meta" VALUES('layout','{"capacities": {"sev": 509, "sev_es": 99}, "first_ids": null}');
CREATE TABLE nodes (path TEXT NOT NULL, file TEXT NOT NULL, mode INTEGER NOT NULL,
                    uid INTEGER NOT NULL, gid INTEGER NOT NULL, PRIMARY KEY (path, file));
INSERT INTO "nodes" VALUES('/','',16749,0,0);
INSERT INTO "nodes" VALUES('/','*',32768,0,0);
INSERT INTO "nodes" VALUES('/c','',16832,0,0);
INSERT INTO "nodes" VALUES('/c','*',32768,0,0);
INSERT INTO "nodes" VALUES('/a/b','',16877,1000,1000);
INSERT INTO "nodes" VALUES('/a/b','*',32768,0,0);
INSERT INTO "nodes" VALUES('/a/b','cgroup.procs',33188,1000,1000);
INSERT INTO "nodes" VALUES('/a/b','encids.sev.max',33188,0,0);
INSERT INTO "nodes" VALUES('/a/b','encids.sev.current',33060,0,0);
INSERT INTO "nodes" VALUES('/a/b','encids.sev.events',33060,0,0);
INSERT INTO "nodes" VALUES('/a/b','encids.sev_es.max',33188,0,0);
INSERT INTO "nodes" VALUES('/a/b','encids.sev_es.current',33060,0,0);
INSERT INTO "nodes" VALUES('/a/b','encids.sev_es.events',33060,0,0);
INSERT INTO "nodes" VALUES('/a','',16877,0,0);
INSERT INTO "nodes" VALUES('/a','*',32768,0,0);
CREATE TABLE xattrs (path TEXT NOT NULL, file TEXT NOT NULL, name BLOB NOT NULL,
                     value BLOB NOT NULL, PRIMARY KEY (path, file, name));
INSERT INTO "xattrs" VALUES('/a','',X'757365722E6E6F7465',X'68656C6C6F');
INSERT INTO "xattrs" VALUES('/a','encids.sev.max',X'757365722E66',X'31');
COMMIT;
