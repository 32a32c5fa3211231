import Foundation
import Granary
import GranaryTestSupport
import SystemPackage
import Testing

/// The cluster file users write or generate: the configuration plus the coordination store and
/// the lease, checked on load with errors that name the field.
@Suite("Cluster file format")
struct ClusterFileFormatTests {
    func configuration() throws -> Configuration {
        let nodes = (0..<3).map { NodeID($0) }
        return try Configuration(id: ConfigurationID(rawValue: 1), cluster: ClusterID.random(),
                                 members: nodes.map { Member(node: $0, endpoint: "shm:\($0)") },
                                 regions: Configuration.balancedPlacement(nodes: nodes, regionsPerNode: 1, replicas: 3),
                                 regionSize: 1 << 20)
    }

    /// The file's JSON object with `change` applied, loaded from disk; the error's text, or nil.
    func loadError(_ change: (inout [String: Any]) -> Void) throws -> String? {
        let tmp = TemporaryDirectory("granary-cluster-file-format")
        defer { tmp.remove() }
        let file = try ClusterFile(configuration: configuration(), coordination: "zookeeper://127.0.0.1:2181", leaseMilliseconds: 10)
        var object = try #require(try JSONSerialization.jsonObject(with: JSONEncoder().encode(file)) as? [String: Any])
        change(&object)
        let path = tmp.path.appending("cluster.json").string
        try JSONSerialization.data(withJSONObject: object).write(to: URL(fileURLWithPath: path))
        do {
            _ = try ClusterFile.load(path)
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test("the coordination store and the lease go into the file and come back; a file without them (as Cluster.local writes) loads with neither")
    func roundTrip() throws {
        let tmp = TemporaryDirectory("granary-cluster-file-format")
        defer { tmp.remove() }
        let file = try ClusterFile(configuration: configuration(), coordination: "zookeeper://10.0.0.1:2181,10.0.0.2:2181", leaseMilliseconds: 25)
        let path = tmp.path.appending("cluster.json").string
        try JSONEncoder().encode(file).write(to: URL(fileURLWithPath: path))
        let loaded = try ClusterFile.load(path)
        #expect(loaded == file)
        #expect(try ClusterFile.zooKeeperAddress(loaded.coordination!) == "10.0.0.1:2181,10.0.0.2:2181")
        // A plain configuration is a cluster file naming no store and no lease.
        try JSONEncoder().encode(file.configuration).write(to: URL(fileURLWithPath: path))
        let plain = try ClusterFile.load(path)
        #expect(plain.configuration == file.configuration && plain.coordination == nil && plain.leaseMilliseconds == nil)
        // And the configuration decoder reads a cluster file (the extra fields are the file's).
        try JSONEncoder().encode(file).write(to: URL(fileURLWithPath: path))
        #expect(try JSONDecoder().decode(Configuration.self, from: Data(contentsOf: URL(fileURLWithPath: path))) == file.configuration)
    }

    @Test("a wrong value, a missing field or a file that is not JSON is an error naming the file and the field")
    func errorsNameTheField() throws {
        let cases: [(String, (inout [String: Any]) -> Void, [String])] = [
            ("a store that is not ZooKeeper", { $0["coordination"] = "zk://127.0.0.1:2181" }, ["coordination", "zk://127.0.0.1:2181"]),
            ("a store without a port", { $0["coordination"] = "zookeeper://127.0.0.1" }, ["coordination", "host:port"]),
            ("a port out of range", { $0["coordination"] = "zookeeper://a:70000" }, ["coordination", "1 to 65535"]),
            ("a lease of 0 ms", { $0["leaseMilliseconds"] = 0 }, ["leaseMilliseconds", "0"]),
            ("a lease that is a string", { $0["leaseMilliseconds"] = "10ms" }, ["leaseMilliseconds", "number"]),
            ("an endpoint that is a number", { object in
                var members = object["members"] as! [[String: Any]]
                members[1]["endpoint"] = 7
                object["members"] = members
            }, ["members[1].endpoint", "string"]),
            ("an endpoint of no known form", { object in
                var members = object["members"] as! [[String: Any]]
                members[2]["endpoint"] = "tcp://10.0.0.3:7471"
                object["members"] = members
            }, ["members[2].endpoint", "tcp://10.0.0.3:7471", "verbs://ip:port/"]),
            ("a verbs address without a directory", { object in
                var members = object["members"] as! [[String: Any]]
                members[0]["endpoint"] = "verbs://10.0.0.1:7471"
                object["members"] = members
            }, ["members[0].endpoint", "verbs://10.0.0.1:7471"]),
            ("a verbs address without a port", { object in
                var members = object["members"] as! [[String: Any]]
                members[0]["endpoint"] = "verbs://10.0.0.1/var/lib/granary/n0"
                object["members"] = members
            }, ["members[0].endpoint", "1 to 65535"]),
            ("no region size", { $0["regionSize"] = nil }, ["regionSize is missing"]),
            ("a region size that is not a power of two", { $0["regionSize"] = 3_000_000 }, ["3000000"]),
        ]
        for (what, change, expected) in cases {
            let error = try loadError(change)
            #expect(error != nil, "\(what): the file loaded")
            for text in expected {
                #expect(error?.contains(text) ?? false, "\(what): the error does not say '\(text)': \(error ?? "")")
            }
            #expect(error?.contains("cluster.json") ?? false, "\(what): the error does not name the file: \(error ?? "")")
        }
        let tmp = TemporaryDirectory("granary-cluster-file-format")
        defer { tmp.remove() }
        let path = tmp.path.appending("cluster.json").string
        try Data("{ \"members\": [".utf8).write(to: URL(fileURLWithPath: path))
        #expect(throws: ConfigurationError.self) { try ClusterFile.load(path) }
        do { _ = try ClusterFile.load(path) } catch { #expect("\(error)".contains("not JSON"), "\(error)") }
        do {
            _ = try ClusterFile.load(path + ".missing")
            Issue.record("a missing cluster file loaded")
        } catch {
            #expect("\(error)".contains("cannot read the cluster file \(path).missing"), "\(error)")
        }
    }

    @Test("endpoints: shm:, verbs: and verbs://ip:port/dir are read; a relative directory resolves against the file, an address's never changes")
    func endpoints() throws {
        #expect(MemberEndpoint("shm:n0") == .sharedMemory(directory: "n0"))
        #expect(MemberEndpoint("verbs:/tmp/c/n1") == .verbsDirectory("/tmp/c/n1"))
        let remote = try #require(MemberEndpoint("verbs://10.78.0.2:7472/tmp/granary/n1"))
        #expect(remote == .verbsAddress("10.78.0.2:7472", directory: "/tmp/granary/n1"))
        #expect(remote.isRemote && remote.directory == "/tmp/granary/n1")
        #expect(!MemberEndpoint("verbs:n1")!.isRemote)
        for bad in ["", "shm:", "verbs:", "verbs://10.0.0.1:7471", "verbs://10.0.0.1:0/d", "verbs://:7471/d", "verbs://h:p/d", "n0"] {
            #expect(MemberEndpoint(bad) == nil, "'\(bad)' was read as an endpoint")
        }
        let root = FilePath("/srv/cluster")
        #expect(Cluster.resolve("verbs:n1", against: root) == "verbs:/srv/cluster/n1")
        #expect(Cluster.resolve("shm:n0", against: root) == "shm:/srv/cluster/n0")
        #expect(Cluster.resolve("verbs://10.78.0.2:7472/tmp/granary/n1", against: root) == "verbs://10.78.0.2:7472/tmp/granary/n1")
    }
}
