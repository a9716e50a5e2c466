/*
 * A Sparkplug B edge node's Template (UDT) payloads, encoded by Eclipse Tahu 1.0.12 (tahu-core,
 * Maven Central) for tests/test_sparkplug_templates.py: an implementation independent of
 * scopemeter's host encodes them, and the Python test publishes the bytes through Mosquitto in the
 * order written. The values below are the ones the test states it expects in PostgreSQL.
 *
 * Usage: java -cp <tahu jars>:<classes> TahuTemplateNode OUT_DIR BDSEQ BASE_MS
 *
 * Writes OUT_DIR/NN-KIND[-DEVICE].bin:
 *   00-NBIRTH       seq 0: bdSeq, Node Control/Rebirth, an instance "Incomer" of "Phase" (alias
 *                   200, member alias 201, Energy kWh = 5000.5 at BASE_MS) listed before the two
 *                   Template definitions:
 *                   "Phase" {Energy kWh: Float} and
 *                   "PowerMeter" {Energy Import kWh: Double, Power W: Int32, Serial: String,
 *                                 Phase A: Template instance of "Phase"}
 *   01-DBIRTH-pm1   seq 1: instance "Meter1" of PowerMeter, alias 100, every member with an alias
 *                   (101..105) and its value at BASE_MS + 1000
 *   02-DDATA-pm1    seq 2: Meter1 by alias only, members Energy Import kWh (alias only) = 1235.75
 *                   and Power W (alias only) = -420, at BASE_MS + 2000
 *   03-DDATA-pm1    seq 3: Meter1 by alias only, the nested Phase A / Energy kWh (aliases only)
 *                   = 401.5, at BASE_MS + 3000
 *   04-NDATA        seq 4: Incomer by alias only, Energy kWh (alias only) = 5001.25, at BASE_MS + 4000
 */

import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Date;

import org.eclipse.tahu.message.SparkplugBPayloadEncoder;
import org.eclipse.tahu.message.model.Metric;
import org.eclipse.tahu.message.model.Metric.MetricBuilder;
import org.eclipse.tahu.message.model.MetricDataType;
import org.eclipse.tahu.message.model.SparkplugBPayload;
import org.eclipse.tahu.message.model.SparkplugBPayload.SparkplugBPayloadBuilder;
import org.eclipse.tahu.message.model.Template;
import org.eclipse.tahu.message.model.Template.TemplateBuilder;

public final class TahuTemplateNode {
    private static final SparkplugBPayloadEncoder ENCODER = new SparkplugBPayloadEncoder();

    private static Metric metric(String name, Long alias, MetricDataType type, Object value, long ts)
            throws Exception {
        MetricBuilder b = new MetricBuilder(name, type, value).timestamp(new Date(ts));
        if (alias != null) {
            b.alias(alias);
        }
        return b.createMetric();
    }

    private static Metric byAlias(long alias, MetricDataType type, Object value, long ts) throws Exception {
        return new MetricBuilder(alias, type, value).timestamp(new Date(ts)).createMetric();
    }

    private static void write(Path dir, String file, long seq, long ts, Metric... metrics) throws Exception {
        SparkplugBPayloadBuilder p = new SparkplugBPayloadBuilder(seq).setTimestamp(new Date(ts));
        for (Metric m : metrics) {
            p.addMetric(m);
        }
        SparkplugBPayload payload = p.createPayload();
        Files.write(dir.resolve(file), ENCODER.getBytes(payload, false));
    }

    public static void main(String[] args) throws Exception {
        Path dir = Paths.get(args[0]);
        long bdSeq = Long.parseLong(args[1]);
        long base = Long.parseLong(args[2]);
        Files.createDirectories(dir);

        // NBIRTH: the definitions (is_definition = true, no template_ref).
        Template phaseDef = new TemplateBuilder().version("1.0").definition(true)
                .addMetric(metric("Energy kWh", null, MetricDataType.Float, 0.0f, base)).createTemplate();
        Template phaseInDef = new TemplateBuilder().templateRef("Phase").definition(false)
                .addMetric(metric("Energy kWh", null, MetricDataType.Float, 0.0f, base)).createTemplate();
        Template meterDef = new TemplateBuilder().version("1.0").definition(true)
                .addMetric(metric("Energy Import kWh", null, MetricDataType.Double, 0.0, base))
                .addMetric(metric("Power W", null, MetricDataType.Int32, 0, base))
                .addMetric(metric("Serial", null, MetricDataType.String, "", base))
                .addMetric(metric("Phase A", null, MetricDataType.Template, phaseInDef, base))
                .createTemplate();
        Template incomer = new TemplateBuilder().templateRef("Phase").definition(false)
                .addMetric(metric("Energy kWh", 201L, MetricDataType.Float, 5000.5f, base)).createTemplate();
        write(dir, "00-NBIRTH.bin", 0, base,
                metric("bdSeq", null, MetricDataType.Int64, bdSeq, base),
                metric("Node Control/Rebirth", null, MetricDataType.Boolean, false, base),
                metric("Incomer", 200L, MetricDataType.Template, incomer, base),
                metric("Phase", null, MetricDataType.Template, phaseDef, base),
                metric("PowerMeter", null, MetricDataType.Template, meterDef, base));

        // DBIRTH: the instance with every member, names and aliases.
        long t1 = base + 1000;
        Template phaseA = new TemplateBuilder().templateRef("Phase").definition(false)
                .addMetric(metric("Energy kWh", 105L, MetricDataType.Float, 400.25f, t1)).createTemplate();
        Template meter1 = new TemplateBuilder().templateRef("PowerMeter").definition(false)
                .addMetric(metric("Energy Import kWh", 101L, MetricDataType.Double, 1234.5, t1))
                .addMetric(metric("Power W", 102L, MetricDataType.Int32, -350, t1))
                .addMetric(metric("Serial", 103L, MetricDataType.String, "SN-0042", t1))
                .addMetric(metric("Phase A", 104L, MetricDataType.Template, phaseA, t1))
                .createTemplate();
        write(dir, "01-DBIRTH-pm1.bin", 1, t1, metric("Meter1", 100L, MetricDataType.Template, meter1, t1));

        // DDATA: a subset of the members, instance and members by alias only.
        long t2 = base + 2000;
        Template change = new TemplateBuilder().templateRef("PowerMeter").definition(false)
                .addMetric(byAlias(101L, MetricDataType.Double, 1235.75, t2))
                .addMetric(byAlias(102L, MetricDataType.Int32, -420, t2))
                .createTemplate();
        write(dir, "02-DDATA-pm1.bin", 2, t2, byAlias(100L, MetricDataType.Template, change, t2));

        // DDATA: only the nested instance's member changed.
        long t3 = base + 3000;
        Template phaseChange = new TemplateBuilder().templateRef("Phase").definition(false)
                .addMetric(byAlias(105L, MetricDataType.Float, 401.5f, t3)).createTemplate();
        Template change2 = new TemplateBuilder().templateRef("PowerMeter").definition(false)
                .addMetric(byAlias(104L, MetricDataType.Template, phaseChange, t3)).createTemplate();
        write(dir, "03-DDATA-pm1.bin", 3, t3, byAlias(100L, MetricDataType.Template, change2, t3));

        // NDATA: the node's own instance.
        long t4 = base + 4000;
        Template incomerChange = new TemplateBuilder().templateRef("Phase").definition(false)
                .addMetric(byAlias(201L, MetricDataType.Float, 5001.25f, t4)).createTemplate();
        write(dir, "04-NDATA.bin", 4, t4, byAlias(200L, MetricDataType.Template, incomerChange, t4));
    }
}
