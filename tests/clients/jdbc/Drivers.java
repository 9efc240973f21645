// The driver matrix's checks for JDBC (pgjdbc, Debian's libpostgresql-jdbc-java), the same ones and
// the same JSON lines as tests/clients/py_drivers.py; tests/e2e/test_pg_drivers.py runs it:
//
//   java -cp /usr/share/java/postgresql.jar Drivers.java PHASE HOST PORT USER PASSWORD DATABASE CA_PEM
//
// (PHASE: main | wake). TLS is sslmode=verify-full against the gateway's CA; authentication is
// SCRAM-SHA-256, the only mechanism the gateway offers.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.TimeoutException;
import org.postgresql.PGStatement;

public class Drivers {
    static final int LARGE_ROWS = 4096;
    static final long CHECK_TIMEOUT_S = 30;
    // Cancel only once the server runs the sleep, seen from a second connection: a CancelRequest
    // that arrived before the query would be lost, and the check would wait 30 s.
    static final String SLEEPERS_SQL =
        "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'";
    static final ExecutorService pool = Executors.newCachedThreadPool(r -> {
        Thread t = new Thread(r);
        t.setDaemon(true);
        return t;
    });

    interface Check {
        String run() throws Exception;
    }

    static String str(String s) {
        return "\"" + s.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") + "\"";
    }

    static void emit(String check, String fields) {
        System.out.println("{\"check\": " + str(check) + (fields.isEmpty() ? "" : ", " + fields) + "}");
        System.out.flush();
    }

    static void bounded(String name, Check check) {
        Future<String> f = pool.submit(check::run);
        try {
            emit(name, f.get(CHECK_TIMEOUT_S, TimeUnit.SECONDS));
        } catch (TimeoutException e) {
            emit(name, "\"error\": " + str("no answer in " + CHECK_TIMEOUT_S + " s"));
            System.exit(1); // the connection is stuck mid-protocol: nothing after this can be trusted
        } catch (Exception e) {
            Throwable cause = e.getCause() != null ? e.getCause() : e;
            emit(name, "\"error\": " + str(cause.toString()));
        }
    }

    public static void main(String[] args) throws Exception {
        String phase = args[0];
        String url = "jdbc:postgresql://" + args[1] + ":" + args[2] + "/" + args[5];
        Properties props = new Properties();
        props.setProperty("user", args[3]);
        props.setProperty("password", args[4]);
        props.setProperty("sslmode", "verify-full");
        props.setProperty("sslrootcert", args[6]);
        props.setProperty("connectTimeout", "45");
        props.setProperty("loginTimeout", "45"); // past the gateway's 30 s wake timeout
        Connection conn = DriverManager.getConnection(url, props);
        String selectV = "select v from kv where k = ?";

        if (phase.equals("wake")) {
            bounded("wake", () -> {
                try (PreparedStatement ps = conn.prepareStatement(selectV)) {
                    ps.setInt(1, 1);
                    ResultSet rs = ps.executeQuery();
                    rs.next();
                    return "\"value\": " + str(rs.getString(1));
                }
            });
            conn.close();
            System.exit(0);
        }

        bounded("connect", () -> {
            try (Statement st = conn.createStatement()) {
                ResultSet rs = st.executeQuery("select current_user, current_database()");
                rs.next();
                String fields = "\"user\": " + str(rs.getString(1)) + ", \"database\": " + str(rs.getString(2));
                st.execute("create table kv (k int primary key, v text)");
                st.execute("insert into kv values (1, 'v0')");
                return fields;
            }
        });

        bounded("param", () -> {
            try (PreparedStatement ps = conn.prepareStatement("select ?::int + 1, ?::text || '!'")) {
                ps.setInt(1, 41);
                ps.setString(2, "hi");
                ResultSet rs = ps.executeQuery();
                rs.next();
                return "\"value\": [" + rs.getInt(1) + ", " + str(rs.getString(2)) + "]";
            }
        });

        bounded("large", () -> {
            try (PreparedStatement ps = conn.prepareStatement("select repeat('x', 1024) from generate_series(1, ?)")) {
                ps.setInt(1, LARGE_ROWS);
                ResultSet rs = ps.executeQuery();
                long rows = 0, bytes = 0;
                while (rs.next()) {
                    rows++;
                    bytes += rs.getString(1).length();
                }
                return "\"rows\": " + rows + ", \"bytes\": " + bytes;
            }
        });

        bounded("prepared", () -> {
            conn.setAutoCommit(false);
            List<String> seen = new ArrayList<>();
            try (PreparedStatement upd = conn.prepareStatement("update kv set v = ? where k = 1");
                 PreparedStatement sel = conn.prepareStatement(selectV)) {
                // Server-side (named) from the first execution, then reused in every transaction.
                sel.unwrap(PGStatement.class).setPrepareThreshold(1);
                for (int i = 1; i <= 3; i++) {
                    upd.setString(1, "v" + i);
                    upd.executeUpdate();
                    sel.setInt(1, 1);
                    ResultSet rs = sel.executeQuery();
                    rs.next();
                    seen.add(str(rs.getString(1)));
                    conn.commit();
                }
                sel.setInt(1, 1);
                ResultSet rs = sel.executeQuery();
                rs.next();
                seen.add(str(rs.getString(1)));
                conn.commit();
                boolean named = sel.unwrap(PGStatement.class).isUseServerPrepare();
                return "\"values\": [" + String.join(", ", seen) + "], \"server_prepared\": " + named;
            } finally {
                conn.setAutoCommit(true);
            }
        });

        bounded("rollback", () -> {
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.execute("insert into kv values (99, 'gone')");
                conn.rollback();
                ResultSet rs = st.executeQuery("select count(*) from kv where k = 99");
                rs.next();
                int n = rs.getInt(1);
                conn.commit();
                return "\"count\": " + n;
            } finally {
                conn.setAutoCommit(true);
            }
        });

        bounded("cancel", () -> {
            try (Statement st = conn.createStatement()) {
                Future<?> canceller = pool.submit(() -> {
                    try (Connection watcher = DriverManager.getConnection(url, props);
                         Statement w = watcher.createStatement()) {
                        long deadline = System.nanoTime() + 10_000_000_000L;
                        while (System.nanoTime() < deadline) {
                            ResultSet rs = w.executeQuery(SLEEPERS_SQL);
                            rs.next();
                            if (rs.getInt(1) == 1) break;
                            Thread.sleep(20);
                        }
                    }
                    st.cancel(); // pgjdbc sends a CancelRequest with the connection's backend key
                    return null;
                });
                long t0 = System.nanoTime();
                try {
                    st.execute("select pg_sleep(30)");
                    return "\"error\": \"pg_sleep was not cancelled\"";
                } catch (SQLException e) {
                    double seconds = (System.nanoTime() - t0) / 1e9;
                    canceller.get();
                    ResultSet rs = st.executeQuery("select 1");
                    rs.next();
                    return "\"sqlstate\": " + str(e.getSQLState()) + ", \"seconds\": " + seconds + ", \"after\": " + rs.getInt(1);
                }
            }
        });

        conn.close();
        System.exit(0);
    }
}
